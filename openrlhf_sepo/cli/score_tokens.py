"""Score every response token of a preference data set with an oracle / reference pair (SePO step 3).

    --scorer oracle_ref (default):  r(y_t) = log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)
    --scorer token_rm:              r(y_t) = act(head(h_t)), a learned token reward model (token_rm.py), h_t its
                                    last hidden state at y_t
    (fp32, every response token, EOS included)
    --policy.tokenizer PATH:        oracle_ref scores on the oracle's tokens, mapped onto the policy tokenizer's
                                    ids (the ones written) by character overlap, sums kept (token_map.py)

Writes ``OUTPUT_DIR/data/shard-NNNNN.parquet`` (one row per kept pair: index, prompt_len, chosen_input_ids,
rejected_input_ids, chosen_scores, rejected_scores) and ``OUTPUT_DIR/manifest.json`` (models, tokenizer,
data flags, counts, skips by reason, score and selection statistics, timing; ``"complete": true`` at the end).

Rows are cut into fixed shards of ``--score.shard_size`` pairs; shard s is scored by rank s % world_size, so N ranks
never overlap and a rerun skips every shard whose record (``OUTPUT_DIR/shards/shard-NNNNN.json``, written last)
exists: a killed run resumes where it stopped, with any world size. This module holds the flags; the scoring is
``openrlhf_sepo.score_tokens.score_dataset``, the scores-dir format ``openrlhf_sepo.scores_dir``.

    python -m openrlhf_sepo.cli.score_tokens --oracle.model_name_or_path DPO --ref.model_name_or_path SFT \\
        --data.dataset pairs.jsonl --data.apply_chat_template --output_dir scores
    python -m openrlhf_sepo.cli.score_tokens --scorer token_rm --token_rm.model_name_or_path TOKEN_RM \\
        --data.dataset pairs.jsonl --data.apply_chat_template --output_dir scores_rm
"""

import argparse

import torch
from openrlhf.utils.config import hierarchize

from openrlhf_sepo.hh import DEFAULT_MARKER, PROMPT_SPLITS, marker_arg
from openrlhf_sepo.score_tokens import SCORERS, ScoringError, score_dataset

# Re-exported: imported from this module before the engine (score_tokens.py) and rows.py held them.
from openrlhf_sepo.rows import RowTokenizer  # noqa: F401
from openrlhf_sepo.score_tokens import KILL_AFTER_SHARDS_ENV, load_model, load_tokenizer, make_batches  # noqa: F401

ORACLE_REF_FLAGS = (("oracle", "--oracle.model_name_or_path (alias --dpo_model_path)"),
                    ("ref", "--ref.model_name_or_path (alias --ref_model_path)"))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scorer", choices=SCORERS, default="oracle_ref",
                   help="oracle_ref: log pi_oracle - log pi_ref (needs --oracle.* and --ref.*); token_rm: the token "
                        "rewards of a train_token_rm checkpoint (needs --token_rm.model_name_or_path)")
    # Not argparse-required: which of them is needed depends on --scorer (checked in parse_args).
    p.add_argument("--oracle.model_name_or_path", "--dpo_model_path", dest="oracle.model_name_or_path",
                   default=None, help="oracle pi_o (the DPO model); alias --dpo_model_path; --scorer oracle_ref only")
    p.add_argument("--ref.model_name_or_path", "--ref_model_path", dest="ref.model_name_or_path",
                   default=None, help="reference pi_ref (the SFT model); alias --ref_model_path; --scorer oracle_ref only")
    p.add_argument("--policy.tokenizer", dest="policy.tokenizer", default=None,
                   help="the policy's tokenizer (a tokenizer or model dir) when it is not the oracle's: the ids written "
                        "are the policy's, the oracle's token scores are mapped onto them by character overlap "
                        "(openrlhf_sepo/token_map.py); --scorer oracle_ref, fast tokenizers only")
    p.add_argument("--token_rm.model_name_or_path", dest="token_rm.model_name_or_path", default=None,
                   help="a train_token_rm checkpoint (value-head model); --scorer token_rm only")
    p.add_argument("--output_dir", "--save_dir", dest="output_dir", required=True,
                   help="scores dir: data/*.parquet + manifest.json; alias --save_dir")
    p.add_argument("--overwrite", action="store_true", default=False,
                   help="delete what OUTPUT_DIR holds and score from scratch (otherwise: resume the same run, "
                        "error on another run's output)")
    p.add_argument("--k_perc", type=str, default="0.1,0.3,0.5",
                   help="comma-separated selection ratios k for the manifest's selection statistics")
    # The --data.* flags of openrlhf.cli.train_dpo that decide which ids are trained, with its defaults.
    p.add_argument("--data.dataset", type=str, required=True)
    p.add_argument("--data.dataset_probs", type=str, default=None)
    p.add_argument("--data.dataset_split", type=str, default="train")
    p.add_argument("--data.max_samples", type=int, default=1000000)
    p.add_argument("--data.prompt_key", type=str, default=None)
    p.add_argument("--data.chosen_key", type=str, default="chosen")
    p.add_argument("--data.rejected_key", type=str, default="rejected")
    p.add_argument("--data.input_template", type=str, default=None)
    p.add_argument("--data.apply_chat_template", action="store_true", default=False)
    p.add_argument("--data.tokenizer_chat_template", type=str, default=None)
    p.add_argument("--data.max_len", type=int, default=512)
    p.add_argument("--data.prompt_split", choices=PROMPT_SPLITS, default="none",
                   help="rows with no prompt column (HH-RLHF shape): marker / common_prefix split each pair into the "
                        "shared prompt and the final answers (openrlhf_sepo.hh.split_prompt); none: as OpenRLHF")
    p.add_argument("--data.assistant_marker", type=marker_arg, default=DEFAULT_MARKER,
                   help="the text that opens an assistant turn, for --data.prompt_split (\\n typed here is a newline)")
    p.add_argument("--data.disable_fast_tokenizer", action="store_true", default=False)
    p.add_argument("--data.seed", type=int, default=42,
                   help="seed of the --data.dataset_probs interleaving (train_dpo's --train.seed)")
    p.add_argument("--score.micro_batch_size", type=int, default=8, help="pairs per forward batch (per rank)")
    p.add_argument("--score.max_tokens", type=int, default=0,
                   help="token budget per batch (2 x pairs x padded length); 0: micro_batch_size alone decides")
    p.add_argument("--score.shard_size", type=int, default=1024,
                   help="pairs per output shard: the unit of work distribution and of resumption")
    p.add_argument("--score.tokenize_ahead", type=int, default=1,
                   help="shards tokenized ahead of the forward by one background thread (the first while the models "
                        "load), so the forward never waits for the tokenizer; 0: each shard on the main thread, "
                        "just before its forward")
    p.add_argument("--ds.param_dtype", type=str, default=None, choices=["bf16", "fp16", "fp32"],
                   help="model weights dtype (default bf16 on GPU, fp32 on CPU); scores are always fp32")
    p.add_argument("--ds.attn_implementation", type=str, default="sdpa")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = hierarchize(parser.parse_args(argv))
    # Each scorer takes its own models and no other's: a model path that would be silently ignored is an error.
    given = {name: getattr(args, name).model_name_or_path is not None for name in ("oracle", "ref", "token_rm")}
    if args.scorer == "oracle_ref":
        if given["token_rm"]:
            parser.error("--token_rm.model_name_or_path is used only with --scorer token_rm: add --scorer token_rm "
                         "(and drop --oracle.* / --ref.*)")
        for name, flag in ORACLE_REF_FLAGS:
            if not given[name]:
                parser.error(f"{flag} is required with --scorer oracle_ref (the default)")
    else:
        if not given["token_rm"]:
            parser.error("--token_rm.model_name_or_path is required with --scorer token_rm")
        for name, flag in ORACLE_REF_FLAGS:
            if given[name]:
                parser.error(f"{flag} is not used with --scorer token_rm (the token reward model alone scores): drop it")
    if args.policy.tokenizer is not None:
        if args.scorer != "oracle_ref":
            parser.error("--policy.tokenizer is supported with --scorer oracle_ref only")
        if args.data.disable_fast_tokenizer:
            parser.error("--policy.tokenizer maps tokens by character offsets, which need fast tokenizers: "
                         "drop --data.disable_fast_tokenizer")
    try:
        args.k_perc = sorted({float(k) for k in args.k_perc.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"--k_perc must be comma-separated numbers in (0, 1], got {args.k_perc!r}")
    if not args.k_perc or not all(0 < k <= 1 for k in args.k_perc):
        raise SystemExit(f"--k_perc must be comma-separated numbers in (0, 1], got {args.k_perc}")
    if args.data.input_template and "{}" not in args.data.input_template:
        raise SystemExit(f"--data.input_template must contain '{{}}', got {args.data.input_template!r}")
    for flag, value in (("--score.micro_batch_size", args.score.micro_batch_size),
                        ("--score.shard_size", args.score.shard_size), ("--data.max_len", args.data.max_len)):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    if args.score.tokenize_ahead < 0:
        raise SystemExit(f"--score.tokenize_ahead must be >= 0, got {args.score.tokenize_ahead}")
    if args.ds.param_dtype is None:
        args.ds.param_dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return args


def main(argv=None):
    """-> the manifest (rank 0) or None; an error in the flags, models or output dir exits with its message."""
    args = parse_args(argv)
    try:
        return score_dataset(args)
    except ScoringError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
