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

Rows are cut into fixed shards of ``--score.shard_size`` pairs; shard s is scored by rank s % world_size, so
N ranks never overlap and a rerun skips every shard whose record (``OUTPUT_DIR/shards/shard-NNNNN.json``,
written last) exists: a killed run resumes where it stopped, with any world size.

    python -m openrlhf_sepo.cli.score_tokens --oracle.model_name_or_path DPO --ref.model_name_or_path SFT \\
        --data.dataset pairs.jsonl --data.apply_chat_template --output_dir scores
    python -m openrlhf_sepo.cli.score_tokens --scorer token_rm --token_rm.model_name_or_path TOKEN_RM \\
        --data.dataset pairs.jsonl --data.apply_chat_template --output_dir scores_rm
"""

import argparse
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time

import openrlhf_sepo  # noqa: F401  (flash-attn kernel placeholder, before OpenRLHF is imported)
import torch
from openrlhf.datasets import RewardDataset
from openrlhf.datasets.utils import blending_datasets
from openrlhf.utils import get_tokenizer
from openrlhf.utils.config import hierarchize

from openrlhf_sepo.datasets import DataStrategy
from openrlhf_sepo.hh import DEFAULT_MARKER, PROMPT_SPLITS, marker_arg, split_prompt
from openrlhf_sepo.scoring import select_key_tokens, token_scores, tokenizer_fingerprint
from openrlhf_sepo.token_map import MappingError, map_tokens, response_tokens, special_ids
from openrlhf_sepo.token_rm import checkpoint_settings, load_token_rm, token_rewards

FORMAT_VERSION = 1
SKIP_REASONS = (
    "missing_key",  # a prompt / chosen / rejected key absent or null
    "non_text",  # a value that is neither text nor a list of {"role", "content": str} messages
    "empty_response",  # chosen or rejected empty or whitespace-only
    "empty_prompt",  # prompt of 0 tokens: the first response token would have no context to be scored from
    "prompt_too_long",  # fewer than 2 response tokens left within --data.max_len
    "identical_responses",  # chosen and rejected tokenize to the same ids
    "no_shared_prompt",  # --data.prompt_split: the two sides share no prompt (openrlhf_sepo.hh.split_prompt)
    "mapping_failed",  # --policy.tokenizer: the oracle's tokens cannot be mapped onto the policy's (token_map.py)
)
SKIP_EXAMPLES_KEPT = 20  # per reason, with their messages, in the manifest
# Test hook: SIGKILL this process after it has written this many shards (simulates a crash mid-run).
KILL_AFTER_SHARDS_ENV = "SEPO_SCORE_KILL_AFTER_SHARDS"
SCORERS = ("oracle_ref", "token_rm")
# The manifest's formula per scorer; a token RM's z_t = value_head(h_t), h_t its last hidden state at y_t
# (it has seen x and y_<=t), act the activation it was trained with (token_rm.activation).
FORMULAS = {
    "oracle_ref": "score_t = log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t), fp32, every response token",
    "softplus": "score_t = softplus(1 - softplus(1 - z_t)), z_t = value_head(h_t) of the token RM at y_t "
                "(h_t has seen x, y_<=t), fp32, every response token",
    "sigmoid": "score_t = sigmoid(z_t), z_t = value_head(h_t) of the token RM at y_t (h_t has seen x, y_<=t), "
               "fp32, every response token",
}
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
    if args.ds.param_dtype is None:
        args.ds.param_dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return args


class _NoRows:
    """An empty stand-in data set: lets RewardDataset.__init__ set up its tokenizer state with no rows to map."""

    column_names = []

    def map(self, *args, **kwargs):
        return self

    def filter(self, *args, **kwargs):
        return self

    def __getitem__(self, column):
        return []


class RowTokenizer(RewardDataset):
    """OpenRLHF's ``RewardDataset(is_dpo=True)``, one row at a time, keeping the row's index.

    RewardDataset tokenizes the whole data set in its constructor and drops a long-prompt row without a trace;
    here ``encode`` runs its own ``process_data`` and ``__getitem__`` on a single row, so the ids are exactly
    the trainer's, and every row that is not kept comes back with a reason.

    With ``--data.prompt_split marker|common_prefix`` a row with no prompt column is first split by
    ``openrlhf_sepo.hh.split_prompt`` and handed to ``process_data`` as a ``{"prompt", "chosen", "rejected"}``
    row with prompt key ``"prompt"``: OpenRLHF's own prompt-key path then makes the ids, and only the final
    answers are response tokens.
    """

    def __init__(self, tokenizer, strategy):
        data = strategy.args.data
        super().__init__(_NoRows(), tokenizer, data.max_len, strategy, input_template=data.input_template,
                         is_dpo=True, num_processors=1)
        self.prompt_split = getattr(data, "prompt_split", "none")
        self.assistant_marker = getattr(data, "assistant_marker", DEFAULT_MARKER)
        # The keys _check reads in a row as the data set has it; a split row has OpenRLHF's keys below.
        self.row_keys = [self.chosen_key, self.rejected_key] + ([self.prompt_key] if self.prompt_key else [])
        if self.prompt_split != "none":
            if self.prompt_key:  # before anything is written: a prompt column and a split would disagree
                raise SystemExit(f"--data.prompt_split {self.prompt_split} makes the prompt from chosen and "
                                 f"rejected: drop --data.prompt_key {self.prompt_key!r} (or use --data.prompt_split none)")
            self.prompt_key, self.chosen_key, self.rejected_key = "prompt", "chosen", "rejected"

    def encode(self, row):
        """-> (prompt_len, chosen_ids, rejected_ids), or (reason, message) for a skipped row."""
        result = self.tokenize(row)
        if not isinstance(result[0], str) and result[1] == result[2]:
            return "identical_responses", "chosen and rejected are identical"
        return result

    def tokenize(self, row):
        """``encode`` without its identical-responses check (``RankedListDataset`` tokenizes one response as both)."""
        problem = self._check(row)
        if problem:
            return problem
        if self.prompt_split != "none":
            row = self._split(row)
            if isinstance(row, tuple):
                return row
        out = self.process_data(row)
        if out["prompt"] is None:
            return "prompt_too_long", f"prompt of {out['extra']} tokens leaves < 2 response tokens in max_len {self.max_length}"
        self.prompts, self.chosens, self.rejects, self.extras = [out["prompt"]], [out["chosen"]], [out["reject"]], [out["extra"]]
        chosen_ids, _, rejected_ids, _, prompt_len = self[0]
        chosen_ids, rejected_ids = chosen_ids[0].tolist(), rejected_ids[0].tolist()
        if prompt_len == 0:
            return "empty_prompt", ("the prompt is empty (set --data.prompt_key or --data.apply_chat_template, or "
                                    "--data.prompt_split for rows with no prompt column)")
        shortest = min(len(chosen_ids), len(rejected_ids)) - prompt_len
        if shortest < 2:
            return "prompt_too_long", f"only {shortest} response token(s) left within max_len {self.max_length}"
        return prompt_len, chosen_ids, rejected_ids

    def _check(self, row):
        keys = self.row_keys
        for key in keys:
            if row.get(key) is None:
                return "missing_key", f"key {key!r} is missing or null"
        for key in keys:
            if not _is_text(row[key], messages=bool(self.apply_chat_template)):
                kind = "a list of {'role', 'content': str} messages" if self.apply_chat_template else "a string"
                return "non_text", f"{key!r} is not {kind}: {str(row[key])[:80]!r}"
        return self._check_answers(row, keys[:2])

    def _check_answers(self, row, keys):
        for key in keys:
            value = row[key]
            text = value if isinstance(value, str) else (value[-1]["content"] if value else "")
            if not text.strip():
                return "empty_response", f"{key!r} is empty or whitespace-only"
        return None

    def _split(self, row):
        """--data.prompt_split: the row as {"prompt", "chosen", "rejected"}, or (reason, message)."""
        chosen, rejected = row[self.row_keys[0]], row[self.row_keys[1]]
        if chosen == rejected:  # would split into identical answers; say so rather than "no shared prompt"
            return "identical_responses", "chosen and rejected are identical"
        parts = split_prompt(chosen, rejected, self.prompt_split, self.assistant_marker)
        if parts is None:
            rule = ("the messages before the last (assistant) one differ" if isinstance(chosen, list) else
                    f"chosen has no {self.assistant_marker!r}, or rejected does not start with chosen up to its last one"
                    if self.prompt_split == "marker" else "no common prefix up to a marker or whitespace")
            return "no_shared_prompt", f"--data.prompt_split {self.prompt_split}: {rule}"
        split = dict(zip(("prompt", "chosen", "rejected"), parts))
        problem = self._check_answers(split, ("chosen", "rejected"))
        return problem or split


def _is_text(value, messages):
    if not messages:
        return isinstance(value, str)
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


TOKEN_MAPPING = ("character-overlap split, per-response sum preserved: each oracle token's score is split among the "
                 "policy tokens overlapping its characters, in proportion to the overlap; special tokens matched "
                 "from the end (EOS to EOS); see openrlhf_sepo/token_map.py")


class CrossRowTokenizer:
    """``--policy.tokenizer``: each row tokenized twice by RowTokenizer, with the policy's tokenizer (the ids written)
    and with the oracle's (the ids scored); token_map.py maps the oracle-token scores onto the policy's tokens.

    ``encode`` -> (oracle prompt_len, oracle chosen_ids, oracle rejected_ids, (policy prompt_len, chosen_ids,
    rejected_ids), (chosen TokenMap, rejected TokenMap)), or (reason, message). ``tokenizer`` is the oracle's: the
    batches made of these items are the oracle's ids (score_batch pads them, map_to_policy maps their scores).
    """

    def __init__(self, policy, oracle):
        self.policy, self.oracle, self.tokenizer = policy, oracle, oracle.tokenizer
        self.specials = {"policy": special_ids(policy.tokenizer), "oracle": special_ids(oracle.tokenizer)}

    def encode(self, row):
        sides = {}
        for name, rt in (("policy", self.policy), ("oracle", self.oracle)):
            result = rt.encode(row)
            if isinstance(result[0], str):  # a policy-side skip reads as without the flag
                return result if name == "policy" else (result[0], f"oracle tokenizer: {result[1]}")
            sides[name] = result, (rt.prompts[0], rt.chosens[0], rt.rejects[0])
        maps = []
        for k, side in enumerate(("chosen", "rejected")):
            texts = {}
            for name, rt in (("policy", self.policy), ("oracle", self.oracle)):
                (prompt_len, *ids), strings = sides[name]
                try:
                    texts[name] = response_tokens(rt.tokenizer, strings[0], strings[1 + k], ids[k], prompt_len,
                                                  rt.max_length, self.specials[name])
                except MappingError as e:
                    return "mapping_failed", f"{side}: {e}"
            try:
                maps.append(map_tokens(*texts["oracle"], *texts["policy"]))
            except MappingError as e:
                return "mapping_failed", f"{side}: {e}"
        return (*sides["oracle"][0], sides["policy"][0], tuple(maps))


def map_to_policy(batch, chosen, rejected):
    """CrossRowTokenizer items and their oracle-token scores -> (policy items (index, prompt_len, chosen_ids,
    rejected_ids), policy-token chosen scores, rejected scores)."""
    items, mapped_c, mapped_r = [], [], []
    for (index, _, _, _, policy, (map_c, map_r)), c, r in zip(batch, chosen, rejected):
        items.append((index, *policy))
        mapped_c.append(map_c.apply(c))
        mapped_r.append(map_r.apply(r))
    return items, mapped_c, mapped_r


def cross_tokenizer_identity(oracle_path, oracle_tok, policy_tok):
    """The manifest / run-id entries of --policy.tokenizer; SystemExit when a tokenizer has no character offsets."""
    for flag, tok in (("--policy.tokenizer", policy_tok), ("--oracle.model_name_or_path", oracle_tok)):
        if not getattr(tok, "is_fast", False):
            raise SystemExit(f"--policy.tokenizer maps tokens by character offsets (return_offsets_mapping), which "
                             f"needs fast tokenizers: the tokenizer of {flag} {tok.name_or_path!r} is a "
                             f"{type(tok).__name__}, not a fast tokenizer")
    return {"oracle_tokenizer": {"name_or_path": oracle_path, "fingerprint": tokenizer_fingerprint(oracle_tok)},
            "token_mapping": TOKEN_MAPPING}


# ----------------------------------------------------------------------------------------------- identity


def model_identity(path, flag):
    """Path, config, and a cheap weights fingerprint (name, size, first and last MiB of every weight file)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    except (OSError, ValueError) as e:  # no such dir / no config.json / an unknown model type
        raise SystemExit(f"{flag}: cannot read a model config from {path!r}: {e}")
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin")))
    for name in files:
        size = os.path.getsize(name)
        digest.update(f"{os.path.basename(name)}:{size}".encode())
        with open(name, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return {"name_or_path": path, "config": config.to_dict(), "weights_fingerprint": digest.hexdigest()[:16]}


def load_tokenizer(args, path, flag):
    try:
        return get_tokenizer(path, None, "right", None, use_fast=not args.data.disable_fast_tokenizer)
    except Exception as e:  # noqa: BLE001  (re-raised with the flag that named the path)
        raise SystemExit(f"{flag}: cannot load a tokenizer from {path!r}: {e}")


def token_rm_settings(identity):
    """``token_rm.checkpoint_settings`` of the checkpoint behind ``identity`` (``model_identity``), as a SystemExit
    naming the flag: the manifest and the run id need the settings before any model is loaded, so a path that is not
    a token RM fails here, before anything is written (``load_token_rm`` checks again when it loads the weights)."""
    try:
        return checkpoint_settings(identity["config"], identity["name_or_path"])
    except ValueError as e:
        raise SystemExit(f"--token_rm.model_name_or_path {e}") from None


def check_compatible(oracle_id, ref_id, oracle_tok, ref_tok):
    """Oracle and reference must share a tokenizer and a vocabulary: scores compare their log-probs id by id."""
    a, b = tokenizer_fingerprint(oracle_tok), tokenizer_fingerprint(ref_tok)
    if a != b:
        raise SystemExit(
            f"oracle and reference tokenizers differ (fingerprints {a} vs {b}; vocab sizes {len(oracle_tok)} vs "
            f"{len(ref_tok)}): token scores need one shared tokenizer"
        )
    va, vb = oracle_id["config"].get("vocab_size"), ref_id["config"].get("vocab_size")
    if va != vb:
        raise SystemExit(f"oracle and reference vocabularies differ (config vocab_size {va} vs {vb})")


# ----------------------------------------------------------------------------------------------- output dir


def _atomic_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)


def prepare_output_dir(out, run_id, overwrite, rank):
    """Same run: resume. Another run's output: error unless --overwrite. Every rank decides alike; rank 0 acts."""
    manifest_path = os.path.join(out, "manifest.json")
    has_shards = bool(glob.glob(os.path.join(out, "data", "*.parquet")) or glob.glob(os.path.join(out, "shards", "*.json")))
    previous = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            previous = json.load(f).get("run_id")
    if overwrite:
        if rank == 0:
            for sub in ("data", "shards"):
                shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
            if os.path.exists(manifest_path):
                os.remove(manifest_path)
        return
    if (previous is not None and previous != run_id) or (previous is None and has_shards):
        raise SystemExit(
            f"--output_dir {out} holds another run's scores (run_id {previous}, this run {run_id}: different scorer, "
            "models, tokenizer, data flags or shard size); pass --overwrite to replace them, or pick another --output_dir"
        )


def shard_path(out, shard, kind):
    return os.path.join(out, "data" if kind == "parquet" else "shards", f"shard-{shard:05d}.{kind}")


def write_shard(out, shard, records, record_json):
    """Parquet first, then its JSON record (the 'done' mark), both by atomic rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if records:
        schema = pa.schema([
            ("index", pa.int64()), ("prompt_len", pa.int64()),
            ("chosen_input_ids", pa.list_(pa.int64())), ("rejected_input_ids", pa.list_(pa.int64())),
            ("chosen_scores", pa.list_(pa.float32())), ("rejected_scores", pa.list_(pa.float32())),
        ])
        table = pa.Table.from_pylist(records, schema=schema)
        tmp = os.path.join(out, "shards", f".shard-{shard:05d}.parquet.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, shard_path(out, shard, "parquet"))
    _atomic_json(shard_path(out, shard, "json"), record_json)


# ----------------------------------------------------------------------------------------------- statistics


def new_stats(k_perc):
    side = lambda: {"tokens": 0, "sum": 0.0, "sumsq": 0.0, "min": math.inf, "max": -math.inf}  # noqa: E731
    sel = lambda: {"selected": 0, "selected_sum": 0.0}  # noqa: E731
    return {
        "pairs_read": 0, "pairs_kept": 0, "skipped": {r: 0 for r in SKIP_REASONS}, "skipped_examples": [],
        "chosen": side(), "rejected": side(), "pairs_chosen_sum_higher": 0,
        "selection": {str(k): {"chosen": sel(), "rejected": sel()} for k in k_perc},
        "tokens": 0, "compute_s": 0.0,
    }


def add_scores(stats, k_perc, chosen, rejected):
    """Accumulate one batch's per-pair score tensors (lists of 1-D fp32 tensors) into stats."""
    for name, rows in (("chosen", chosen), ("rejected", rejected)):
        s, flat = stats[name], torch.cat(rows).double()
        s["tokens"] += flat.numel()
        s["sum"] += flat.sum().item()
        s["sumsq"] += (flat * flat).sum().item()
        s["min"], s["max"] = min(s["min"], flat.min().item()), max(s["max"], flat.max().item())
        lengths = torch.tensor([len(r) for r in rows])
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        for k in k_perc:
            mask = select_key_tokens(padded, k, largest=(name == "chosen"), lengths=lengths)
            sel = stats["selection"][str(k)][name]
            sel["selected"] += int(mask.sum())
            sel["selected_sum"] += padded[mask].double().sum().item()
    stats["pairs_chosen_sum_higher"] += sum(int(c.sum() > r.sum()) for c, r in zip(chosen, rejected))


def merge_stats(records, k_perc):
    total = new_stats(k_perc)
    for rec in records:
        for key in ("pairs_read", "pairs_kept", "pairs_chosen_sum_higher", "tokens", "compute_s"):
            total[key] += rec[key]
        for reason, n in rec["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + n
        total["skipped_examples"] += rec["skipped_examples"]
        for name in ("chosen", "rejected"):
            a, b = total[name], rec[name]
            a["tokens"] += b["tokens"]
            a["sum"] += b["sum"]
            a["sumsq"] += b["sumsq"]
            a["min"], a["max"] = min(a["min"], b["min"]), max(a["max"], b["max"])
            for k in k_perc:
                for field in ("selected", "selected_sum"):
                    total["selection"][str(k)][name][field] += rec["selection"][str(k)][name][field]
    return total


def summarize(total, k_perc):
    """Manifest sections 'counts', 'score_stats', 'selection' from merged shard records."""

    def side(s):
        n = max(s["tokens"], 1)
        mean = s["sum"] / n
        return {"tokens": s["tokens"], "mean": mean, "std": math.sqrt(max(s["sumsq"] / n - mean * mean, 0.0)),
                "min": s["min"] if s["tokens"] else None, "max": s["max"] if s["tokens"] else None}

    kept = total["pairs_kept"]
    examples = {}
    for ex in sorted(total["skipped_examples"], key=lambda e: e["index"]):
        bucket = examples.setdefault(ex["reason"], [])
        if len(bucket) < SKIP_EXAMPLES_KEPT:
            bucket.append(ex)
    counts = {
        "pairs_read": total["pairs_read"], "pairs_kept": kept, "pairs_skipped": sum(total["skipped"].values()),
        "skipped_by_reason": total["skipped"], "skipped_examples": examples,
    }
    score_stats = {
        "chosen": side(total["chosen"]), "rejected": side(total["rejected"]),
        # The scorer's own pairwise accuracy: how often sum_t r(chosen) > sum_t r(rejected).
        "pair_accuracy": total["pairs_chosen_sum_higher"] / kept if kept else None,
    }
    selection = {}
    for k in k_perc:
        entry = {}
        for name in ("chosen", "rejected"):
            s = total["selection"][str(k)][name]
            entry[name] = {
                "tokens_selected": s["selected"],
                "fraction_selected": s["selected"] / max(total[name]["tokens"], 1),
                "mean_selected_score": s["selected_sum"] / s["selected"] if s["selected"] else None,
            }
        selection[str(k)] = entry
    return counts, score_stats, selection


# ----------------------------------------------------------------------------------------------- scoring


def make_batches(items, micro_batch_size, max_tokens):
    """Length-sorted (longest first, so an out-of-memory shows at once) padded batches of pairs."""
    items = sorted(items, key=lambda it: -max(len(it[2]), len(it[3])))
    batches, batch = [], []
    for it in items:
        width = max(len(it[2]), len(it[3]))  # the batch's padded length: its first (longest) item's
        if batch and (len(batch) == micro_batch_size or (max_tokens and 2 * (len(batch) + 1) * batch_width > max_tokens)):
            batches.append(batch)
            batch = []
        if not batch:
            batch_width = width
        batch.append(it)
    if batch:
        batches.append(batch)
    return batches


def score_batch(scorer, batch, pad_id, device):
    """-> (chosen scores, rejected scores): lists of 1-D fp32 CPU tensors, one per pair, in batch order."""
    seqs = [it[2] for it in batch] + [it[3] for it in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    prompt_lens = [it[1] for it in batch] * 2
    scores = scorer(ids.to(device), mask.to(device), prompt_lens, [len(s) for s in seqs])
    return scores[: len(batch)], scores[len(batch) :]


def score_shard(rows, first_index, row_tokenizer, scorer, args, device, progress):
    """Tokenize, score and summarize one shard's rows -> (parquet records in index order, shard record)."""
    stats = new_stats(args.k_perc)
    started = time.perf_counter()
    items = []
    for offset, row in enumerate(rows):
        index = first_index + offset
        stats["pairs_read"] += 1
        try:
            result = row_tokenizer.encode(row)
        except Exception as e:  # noqa: BLE001  (an unexpected row shape: name the row, keep the cause)
            raise RuntimeError(f"row {index}: cannot tokenize it as train_dpo would: {e!r}") from e
        if isinstance(result[0], str):
            stats["skipped"][result[0]] += 1
            stats["skipped_examples"].append({"index": index, "reason": result[0], "message": result[1]})
            continue
        items.append((index, *result))
    if progress is not None:
        progress.update(len(rows) - len(items))
    records = []
    for batch in make_batches(items, args.score.micro_batch_size, args.score.max_tokens):
        chosen, rejected = score_batch(scorer, batch, row_tokenizer.tokenizer.pad_token_id, device)
        # --policy.tokenizer: scored on the oracle's tokens, written on the policy's
        if isinstance(row_tokenizer, CrossRowTokenizer):
            batch, chosen, rejected = map_to_policy(batch, chosen, rejected)
        add_scores(stats, args.k_perc, chosen, rejected)
        for (index, prompt_len, chosen_ids, rejected_ids), c, r in zip(batch, chosen, rejected):
            if not (torch.isfinite(c).all() and torch.isfinite(r).all()):
                raise RuntimeError(f"row {index}: non-finite token scores (try --ds.param_dtype fp32)")
            records.append({"index": index, "prompt_len": prompt_len, "chosen_input_ids": chosen_ids,
                            "rejected_input_ids": rejected_ids, "chosen_scores": c.tolist(), "rejected_scores": r.tolist()})
        tokens = sum(len(c) + len(r) for c, r in zip(chosen, rejected))
        stats["tokens"] += tokens
        if progress is not None:
            progress.tokens += tokens
            progress.update(len(batch))
            progress.set_postfix(tok_per_s=f"{progress.tokens / max(time.perf_counter() - progress.t0, 1e-9):.0f}")
    stats["pairs_kept"] = len(records)
    stats["compute_s"] = time.perf_counter() - started
    records.sort(key=lambda rec: rec["index"])
    return records, stats


def load_model(path, args, device):
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.ds.param_dtype]
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=dtype, attn_implementation=args.ds.attn_implementation
    )
    return model.to(device).eval()


def make_scorer(args, device):
    """The one place the scorer is chosen and its models loaded: -> score(ids, mask, prompt_lens, lengths).

    ``score`` takes a right-padded batch on ``device`` and returns one 1-D fp32 CPU tensor per row: the scores of
    its response tokens, positions prompt_lens[i] .. lengths[i] - 1 (the first response token and EOS included).
    """
    if args.scorer == "oracle_ref":
        oracle = load_model(args.oracle.model_name_or_path, args, device)
        ref = load_model(args.ref.model_name_or_path, args, device)
        return functools.partial(token_scores, oracle, ref)
    try:
        model, settings = load_token_rm(args.token_rm.model_name_or_path, args.ds.param_dtype,
                                        args.ds.attn_implementation)
    except ValueError as e:
        raise SystemExit(f"--token_rm.model_name_or_path: {e}") from None
    model = model.to(device).eval()

    @torch.inference_mode()
    def score(ids, mask, prompt_lens, lengths):
        # r at absolute position t is token t's reward (read from the hidden state that has seen it): no shift.
        rewards = token_rewards(model, ids, mask, kind=settings["activation"]).cpu()
        return [rewards[i, p:n] for i, (p, n) in enumerate(zip(prompt_lens, lengths))]

    return score


def _dist_setup():
    """Rank, world size and device from the launcher's environment (torchrun / deepspeed), or 1 process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def _sum_across_ranks(values, world, device):
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def run(args):
    """Score the data set into args.output_dir; returns the manifest (rank 0) or None (other ranks)."""
    from tqdm import tqdm

    wall_start = time.time()
    rank, world, device = _dist_setup()
    strategy = DataStrategy(args.data, rank)  # scoring is plain data-parallel inference: no DeepSpeed engine
    out = args.output_dir

    # Everything that can be wrong with the flags is found before a model is loaded. The scorer's models go into
    # the run id: the oracle_ref identity is exactly the one before --scorer existed (its dirs still resume);
    # token_rm's has other keys, so a dir scored by one scorer is "another run" for the other.
    if args.scorer == "oracle_ref":
        oracle_id = model_identity(args.oracle.model_name_or_path, "--oracle.model_name_or_path")
        ref_id = model_identity(args.ref.model_name_or_path, "--ref.model_name_or_path")
        tokenizer_path, tokenizer_flag = args.oracle.model_name_or_path, "--oracle.model_name_or_path"
        tokenizer = load_tokenizer(args, tokenizer_path, tokenizer_flag)
        check_compatible(oracle_id, ref_id, tokenizer, load_tokenizer(args, args.ref.model_name_or_path, "--ref.model_name_or_path"))
        scorer_identity = {"oracle": oracle_id, "ref": ref_id}
        formula = FORMULAS["oracle_ref"]
    else:
        tokenizer_path, tokenizer_flag = args.token_rm.model_name_or_path, "--token_rm.model_name_or_path"
        rm_id = model_identity(tokenizer_path, tokenizer_flag)
        settings = token_rm_settings(rm_id)
        tokenizer = load_tokenizer(args, tokenizer_path, tokenizer_flag)
        scorer_identity = {"scorer": "token_rm", "token_rm": {**rm_id, "settings": settings}}
        formula = FORMULAS[settings["activation"]]
    oracle_tokenizer = None
    if args.policy.tokenizer is not None:  # the oracle's tokenizer scores; the policy's makes the ids (and the run id)
        oracle_tokenizer, tokenizer_path = tokenizer, args.policy.tokenizer
        tokenizer = load_tokenizer(args, tokenizer_path, "--policy.tokenizer")
        scorer_identity.update(cross_tokenizer_identity(args.oracle.model_name_or_path, oracle_tokenizer, tokenizer))
    fingerprint = tokenizer_fingerprint(tokenizer)  # before RewardDataset applies --data.tokenizer_chat_template
    data = blending_datasets(args.data.dataset, args.data.dataset_probs, strategy, args.data.seed,
                             max_count=args.data.max_samples, dataset_split=args.data.dataset_split)
    data = data.select(range(min(args.data.max_samples, len(data))))  # as train_dpo does
    row_tokenizer = RowTokenizer(tokenizer, strategy)
    if oracle_tokenizer is not None:  # the oracle keeps its own chat template: --data.tokenizer_chat_template is the policy's
        oracle_data = argparse.Namespace(**{**vars(args.data), "tokenizer_chat_template": None})
        row_tokenizer = CrossRowTokenizer(row_tokenizer, RowTokenizer(oracle_tokenizer, DataStrategy(oracle_data, rank, quiet=True)))

    data_flags = {k: v for k, v in vars(args.data).items()}
    if data_flags.get("prompt_split") == "none":  # without a split, the run id stays that of earlier versions
        data_flags.pop("prompt_split")
        data_flags.pop("assistant_marker", None)
    data_flags["rows"] = len(data)
    score_flags = {"param_dtype": args.ds.param_dtype, "attn_implementation": args.ds.attn_implementation,
                   "shard_size": args.score.shard_size}
    identity = {**scorer_identity, "tokenizer": fingerprint, "data": data_flags, "score": score_flags}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    prepare_output_dir(out, run_id, args.overwrite, rank)
    n_shards = math.ceil(len(data) / args.score.shard_size)
    manifest = {
        "format": "openrlhf-sepo token scores", "format_version": FORMAT_VERSION, "complete": False, "run_id": run_id,
        "scorer": args.scorer, "formula": formula, **scorer_identity,
        "tokenizer": {"name_or_path": tokenizer_path, "fingerprint": fingerprint},
        "data": data_flags,
        "score": {**score_flags, "micro_batch_size": args.score.micro_batch_size, "max_tokens": args.score.max_tokens,
                  "k_perc": args.k_perc},
        "shards": {"total": n_shards},
    }
    if rank == 0:
        os.makedirs(os.path.join(out, "data"), exist_ok=True)
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        for stale in glob.glob(os.path.join(out, "shards", ".shard-*.tmp-*")):
            os.remove(stale)  # a killed run's half-written parquet
        _atomic_json(os.path.join(out, "manifest.json"), manifest)
    _barrier(world)

    mine = [s for s in range(n_shards) if s % world == rank]
    todo = [s for s in mine if not os.path.exists(shard_path(out, s, "json"))]
    resumed_pairs = sum(min(args.score.shard_size, len(data) - s * args.score.shard_size) for s in mine if s not in todo)
    if len(todo) < len(mine):
        print(f"[rank {rank}] resuming: {len(mine) - len(todo)} of my {len(mine)} shards already done", flush=True)

    scorer = make_scorer(args, device)
    progress = None
    if rank == 0:
        total = sum(min(args.score.shard_size, len(data) - s * args.score.shard_size) for s in mine)
        progress = tqdm(total=total, initial=resumed_pairs, unit="pair", desc=f"scoring (rank 0 of {world})",
                        dynamic_ncols=True, file=sys.stderr)
        progress.tokens, progress.t0 = 0, time.perf_counter()
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, 0))
    score_start = time.time()
    done_here = [0, 0, 0]  # shards, pairs kept, tokens scored by this process
    for n, shard in enumerate(todo, 1):
        lo = shard * args.score.shard_size
        rows = data.select(range(lo, min(lo + args.score.shard_size, len(data))))
        records, stats = score_shard(rows, lo, row_tokenizer, scorer, args, device, progress)
        write_shard(out, shard, records, {"shard": shard, "first_index": lo, "rank": rank, **stats})
        done_here = [done_here[0] + 1, done_here[1] + stats["pairs_kept"], done_here[2] + stats["tokens"]]
        if kill_after and n >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    if progress is not None:
        progress.close()
    done_here = _sum_across_ranks(done_here, world, device)
    _barrier(world)
    if rank != 0:
        return None

    records = []
    for shard in range(n_shards):
        path = shard_path(out, shard, "json")
        if not os.path.exists(path):
            raise RuntimeError(f"shard {shard} has no record ({path}) after all ranks finished")
        with open(path) as f:
            records.append(json.load(f))
    total = merge_stats(records, args.k_perc)
    counts, score_stats, selection = summarize(total, args.k_perc)
    now = time.time()
    manifest.update(
        complete=True, counts=counts, score_stats=score_stats, selection=selection,
        shards={"total": n_shards, "scored_this_run": int(done_here[0]), "resumed": n_shards - int(done_here[0])},
        timing={
            "elapsed_s": now - wall_start, "scoring_elapsed_s": now - score_start,
            "pairs_scored_this_run": int(done_here[1]), "tokens_scored_this_run": int(done_here[2]),
            "tokens_per_s": done_here[2] / max(now - score_start, 1e-9), "world_size": world, "device": str(device),
            "compute_s_all_shards": total["compute_s"],
        },
    )
    _atomic_json(os.path.join(out, "manifest.json"), manifest)
    for reason, n in counts["skipped_by_reason"].items():
        if n:
            first = counts["skipped_examples"][reason][0]
            print(f"skipped {n} pair(s): {reason} (e.g. row {first['index']}: {first['message']})", flush=True)
    print(f"scored {counts['pairs_kept']} of {counts['pairs_read']} pairs -> {out} "
          f"({manifest['timing']['tokens_per_s']:.0f} tokens/s this run)", flush=True)
    if counts["pairs_kept"] == 0:
        raise SystemExit(f"no pair was kept: skipped by reason {counts['skipped_by_reason']}")
    return manifest


def main(argv=None):
    args = parse_args(argv)
    # Tear down only a process group this run created: a caller's (e.g. a batch of jobs under one launcher,
    # python -m openrlhf_sepo.cpu --jobs) must outlive it, with DeepSpeed's groups built on it.
    owned = not torch.distributed.is_initialized()
    try:
        return run(args)
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
