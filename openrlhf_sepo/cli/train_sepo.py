"""``python -m openrlhf_sepo.cli.train_sepo`` (or ``deepspeed --module ...``): SePO policy training.

OpenRLHF's ``train_dpo`` with the flags that apply, same names and defaults (but ``--model.nll_loss_coef``, 1 here:
see its comment), minus the reference model
(``--ref.*``) and the DPO loss flags (``--model.beta``, ``--model.ipo_enable``, ``--model.label_smoothing``), plus
``--sepo.*``. ``--data.dataset`` / ``--eval.dataset`` name ``score_tokens`` output dirs, comma-separated; with
``--sepo.selection confidence`` (ConfPO: no scores needed) they may instead name preference data, read as
``train_dpo`` reads it (OpenRLHF's ``blending_datasets`` and ``RewardDataset(is_dpo=True)``) with its tokenization
flags (``--data.prompt_key`` ... ``--data.tokenizer_chat_template``, ``--data.dataset_split``,
``--data.dataset_probs``, ``--eval.split``, ``--use_ms``), which a scores dir refuses: its ids were fixed when it
was scored.
"""

import argparse
import functools
import os
import sys

from openrlhf_sepo.cli.common import (add_actor_flags, add_data_file_flags, add_template_flags, check_packing,
                                      check_positive, check_score_dirs, exit_on, parse_training_args, training_parser)
from openrlhf_sepo.datasets import SELECTION_MODES, STEP_SELECTIONS

# train_dpo's tokenization flags: they apply to preference data only (--sepo.selection confidence), never to a
# scores dir, whose ids were fixed at scoring time.
TOKENIZATION_FLAGS = ("data.prompt_key", "data.chosen_key", "data.rejected_key", "data.input_template",
                      "data.apply_chat_template", "data.tokenizer_chat_template", "data.dataset_split",
                      "data.dataset_probs", "eval.split", "use_ms")
# What OpenRLHF's blending_datasets reads as a local data file.
DATA_FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")


def selection_ratio(text: str) -> float:
    """argparse type for --sepo.k_*: a float in (0, 1]."""
    try:
        k = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < k <= 1.0:
        raise argparse.ArgumentTypeError(f"{k} is outside (0, 1]")
    return k


def build_parser() -> argparse.ArgumentParser:
    """The train_sepo argument parser (flat dotted names, as OpenRLHF's; ``hierarchize`` nests them)."""
    parser, add = training_parser(
        "train_sepo", __doc__, name="sepo", run_prefix="exp", lr=1e-5, micro_batch_size=8, max_epochs=1, max_len=512,
        model_help="the policy's start (e.g. the SFT model)", data_help="score_tokens output dir(s), comma-separated",
        eval_help="score_tokens output dir(s) for evaluation")

    # OpenRLHF's NLL term. Default 1, not train_dpo's 0: SePO has no reference model to anchor the policy, and on the benchmark
    # (docs/benchmark.md) every preference-only loss broke the answer format at every learning rate tried,
    # while the NLL term kept it. --model.nll_loss_coef 0 gives the published objective.
    add("--model.nll_loss_coef", type=float, default=1.0, help="NLL over the whole chosen response (0: published SePO)")

    # SePO
    add("--sepo.k_chosen", type=selection_ratio, default=0.3, help="share of chosen tokens selected, (0, 1]")
    add("--sepo.k_rejected", type=selection_ratio, default=0.3, help="share of rejected tokens selected, (0, 1]")
    add("--sepo.selection", type=str, default="per_response", choices=list(SELECTION_MODES),
        help="per_response: each response's top-k share (the paper); global: one score threshold per side over "
             "the data set; random: per_response's counts at random positions (--train.seed), a control for "
             "whether the oracle's choice matters; confidence: ConfPO (Yoon et al., ICML 2025), in each step the "
             "tokens of each response whose probability under the current policy is below that response's mean "
             "token probability (no scores: --data.dataset may be preference data; k is ignored)")
    add("--sepo.exclude_common_prefix", action="store_true", default=False,
        help="never select the response tokens that chosen and rejected share at their start (identical tokens in "
             "identical context carry no preference signal); off by default: the benchmark measured no gain")
    add("--sepo.nll_skip_bad", action="store_true", default=False,
        help="leave out of the NLL term (--model.nll_loss_coef) each chosen token that is among its response's "
             "lowest --sepo.k_rejected share of scores and scores below 0 (a scores dir's selections only)")
    add("--sepo.beta", type=float, default=1.0, help="scale of the selected-token log-prob margin, > 0")
    add("--sepo.gamma", type=float, default=0.0, help="target margin")
    add("--sepo.full_logits", action="store_true", default=False,
        help="run the LM head and log-softmax at every position (OpenRLHF's Actor.forward); default: only where a "
             "log-prob is read (the selected tokens, and the chosen response for the NLL term)")
    add_actor_flags(add)

    # train_dpo's tokenization flags, for preference data (--sepo.selection confidence only; TOKENIZATION_FLAGS)
    add_data_file_flags(add)
    add("--data.prompt_key", type=str, default=None)
    add("--data.chosen_key", type=str, default="chosen")
    add("--data.rejected_key", type=str, default="rejected")
    add_template_flags(add, input_template=None)
    add("--use_ms", action="store_true", default=False)
    return parser


def is_scores_dir(path: str) -> bool:
    """Whether ``path`` (one entry of ``--data.dataset``) is a ``score_tokens`` output dir: a dir with a manifest."""
    return os.path.isfile(os.path.join(path.strip(), "manifest.json"))


def reads_scores(args, evaluation: bool = False) -> bool:
    """Whether ``--data.dataset`` (``--eval.dataset`` with ``evaluation``) is read as scores dirs: always, but with
    ``--sepo.selection confidence`` only when its entries are scores dirs (otherwise it is preference data)."""
    spec = args.eval.dataset if evaluation else args.data.dataset
    return args.sepo.selection not in STEP_SELECTIONS or any(is_scores_dir(p) for p in spec.split(",") if p.strip())


def check_data_kind(parser, args):
    """Every data set a scores dir, but with ``--sepo.selection confidence``, where each of ``--data.dataset`` and
    ``--eval.dataset`` is either all scores dirs or all preference data; and no tokenization flag
    (``TOKENIZATION_FLAGS``) unless some preference data is read."""
    given = [(flag, spec, evaluation) for flag, spec, evaluation in (
        ("--data.dataset", args.data.dataset, False), ("--eval.dataset", args.eval.dataset, True)) if spec]
    for flag, spec, evaluation in given:
        entries = [p.strip() for p in spec.split(",") if p.strip()]
        if not reads_scores(args, evaluation):
            for entry in entries:  # a data file OpenRLHF would read as a file (a hub name cannot be checked here)
                path = entry.split("@")[0].strip()
                if os.path.splitext(path)[1].lower() in DATA_FILE_EXTENSIONS and not os.path.isfile(path):
                    parser.error(f"{flag}: preference data file {path!r} does not exist")
            continue
        if args.sepo.selection in STEP_SELECTIONS and not all(is_scores_dir(p) for p in entries):
            parser.error(f"{flag} mixes scores dirs and preference data ({spec!r}): give one kind")
        for entry in entries:
            if os.path.isfile(entry):
                parser.error(f"{flag}: {entry!r} is a file, not a scores dir; preference data is read only with "
                             "--sepo.selection confidence (the other selections need token scores: score_tokens)")
    check_score_dirs(parser, args, [flag for flag, _, evaluation in given if reads_scores(args, evaluation)])
    if all(reads_scores(args, evaluation) for _, _, evaluation in given):
        for dest in TOKENIZATION_FLAGS:
            if functools.reduce(getattr, dest.split("."), args) != parser.get_default(dest):
                parser.error(f"--{dest} applies to preference data (--sepo.selection confidence), not to a scores "
                             "dir: its ids were fixed when it was scored (give the flag to score_tokens)")


def parse_args(argv=None):
    """Parse and check everything that can be checked without a model, so bad input fails before training."""
    parser = build_parser()
    args = parse_training_args(parser, argv, " (score_tokens output dir(s))")
    check_positive(parser, "--sepo.beta", args.sepo.beta)
    check_packing(parser, args)
    if args.sepo.selection in STEP_SELECTIONS:
        for flag, given in (("--sepo.exclude_common_prefix", args.sepo.exclude_common_prefix),
                            ("--sepo.nll_skip_bad", args.sepo.nll_skip_bad)):
            if given:
                parser.error(f"{flag} needs token scores; --sepo.selection {args.sepo.selection} selects from the "
                             "policy's own probabilities and reads none")
    if args.sepo.nll_skip_bad and not args.model.nll_loss_coef > 1e-8:  # OpenRLHF's test for an NLL term
        parser.error("--sepo.nll_skip_bad shapes the NLL term: it needs --model.nll_loss_coef > 0, "
                     f"got {args.model.nll_loss_coef}")
    check_data_kind(parser, args)
    return args


def score_dataset(args, tokenizer, strategy, evaluation=False):
    """The ``TokenScoreDataset`` of ``--data.dataset`` (or ``--eval.dataset``) with the ``--sepo.*`` selection; with
    ``--sepo.selection confidence`` and preference data, OpenRLHF's ``RewardDataset(is_dpo=True)`` of it, read as
    ``train_dpo`` reads it (one process: the rows are tokenized in this one, as the package's row tokenizers do)."""
    from openrlhf_sepo.datasets import TokenScoreDataset
    from openrlhf_sepo.training import blended_rows, data_source

    if not reads_scores(args, evaluation):
        from openrlhf.datasets import RewardDataset

        rows, _ = blended_rows(args, strategy, evaluation)
        return RewardDataset(rows, tokenizer, args.data.max_len, strategy, input_template=args.data.input_template,
                             is_dpo=True, num_processors=1)
    spec, max_samples, _ = data_source(args, evaluation)
    return TokenScoreDataset(
        spec, tokenizer, args.data.max_len, strategy,
        k_chosen=args.sepo.k_chosen, k_rejected=args.sepo.k_rejected, selection=args.sepo.selection,
        max_samples=max_samples, exclude_common_prefix=args.sepo.exclude_common_prefix, seed=args.train.seed,
        nll_skip_bad=args.sepo.nll_skip_bad,
    )


def sepo_trainer(args, **parts):
    from openrlhf_sepo.trainer import SelectiveDPOTrainer

    return SelectiveDPOTrainer(**parts, max_norm=args.max_norm, beta=args.sepo.beta, gamma=args.sepo.gamma,
                               full_logits=args.sepo.full_logits, selection=args.sepo.selection,
                               max_epochs=args.train.max_epochs, save_hf_ckpt=args.ckpt.save_hf,
                               disable_ds_ckpt=args.ckpt.disable_ds)


def main(argv=None) -> int:
    """train_dpo's run (``training.fit``) with a TokenScoreDataset, a SelectiveDPOTrainer and no reference model."""
    from openrlhf_sepo import training
    from openrlhf_sepo.scores_dir import ScoreDataError

    args = parse_args(argv)
    return exit_on(ScoreDataError, "train_sepo", lambda: training.fit(
        args, score_dataset, sepo_trainer, what="pairs", error=ScoreDataError))


if __name__ == "__main__":
    sys.exit(main())
