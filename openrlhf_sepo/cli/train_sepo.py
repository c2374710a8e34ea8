"""``python -m openrlhf_sepo.cli.train_sepo`` (or ``deepspeed --module ...``): SePO policy training.

OpenRLHF's ``train_dpo`` with the flags that apply, same names and defaults (but ``--model.nll_loss_coef``, 1 here:
see its comment), minus the reference model
(``--ref.*``), the DPO loss flags (``--model.beta``, ``--model.ipo_enable``, ``--model.label_smoothing``) and the
tokenization flags (``--data.prompt_key`` ... ``--data.tokenizer_chat_template``, ``--data.dataset_split``,
``--data.dataset_probs``, ``--eval.split``, ``--use_ms``: the ids were fixed when the data was scored), plus
``--sepo.*``. ``--data.dataset`` / ``--eval.dataset`` name ``score_tokens`` output dirs, comma-separated.
"""

import argparse
import sys

from openrlhf_sepo.cli.common import (add_actor_flags, check_packing, check_positive, check_score_dirs, exit_on,
                                      parse_training_args, training_parser)
from openrlhf_sepo.datasets import SELECTION_MODES


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
             "whether the oracle's choice matters")
    add("--sepo.exclude_common_prefix", action="store_true", default=False,
        help="never select the response tokens that chosen and rejected share at their start (identical tokens in "
             "identical context carry no preference signal); off by default: the benchmark measured no gain")
    add("--sepo.beta", type=float, default=1.0, help="scale of the selected-token log-prob margin, > 0")
    add("--sepo.gamma", type=float, default=0.0, help="target margin")
    add("--sepo.full_logits", action="store_true", default=False,
        help="run the LM head and log-softmax at every position (OpenRLHF's Actor.forward); default: only where a "
             "log-prob is read (the selected tokens, and the chosen response for the NLL term)")
    add_actor_flags(add)
    return parser


def parse_args(argv=None):
    """Parse and check everything that can be checked without a model, so bad input fails before training."""
    parser = build_parser()
    args = parse_training_args(parser, argv, " (score_tokens output dir(s))")
    check_positive(parser, "--sepo.beta", args.sepo.beta)
    check_packing(parser, args)
    check_score_dirs(parser, args)
    return args


def score_dataset(args, tokenizer, strategy, evaluation=False):
    """The ``TokenScoreDataset`` of ``--data.dataset`` (or ``--eval.dataset``) with the ``--sepo.*`` selection."""
    from openrlhf_sepo.datasets import TokenScoreDataset
    from openrlhf_sepo.training import data_source

    spec, max_samples, _ = data_source(args, evaluation)
    return TokenScoreDataset(
        spec, tokenizer, args.data.max_len, strategy,
        k_chosen=args.sepo.k_chosen, k_rejected=args.sepo.k_rejected, selection=args.sepo.selection,
        max_samples=max_samples, exclude_common_prefix=args.sepo.exclude_common_prefix, seed=args.train.seed,
    )


def sepo_trainer(args, **parts):
    from openrlhf_sepo.trainer import SelectiveDPOTrainer

    return SelectiveDPOTrainer(**parts, max_norm=args.max_norm, beta=args.sepo.beta, gamma=args.sepo.gamma,
                               full_logits=args.sepo.full_logits, max_epochs=args.train.max_epochs,
                               save_hf_ckpt=args.ckpt.save_hf, disable_ds_ckpt=args.ckpt.disable_ds)


def main(argv=None) -> int:
    """train_dpo's run (``training.fit``) with a TokenScoreDataset, a SelectiveDPOTrainer and no reference model."""
    from openrlhf_sepo import training
    from openrlhf_sepo.scores_dir import ScoreDataError

    args = parse_args(argv)
    return exit_on(ScoreDataError, "train_sepo", lambda: training.fit(
        args, score_dataset, sepo_trainer, what="pairs", error=ScoreDataError))


if __name__ == "__main__":
    sys.exit(main())
