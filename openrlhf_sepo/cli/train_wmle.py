"""``python -m openrlhf_sepo.cli.train_wmle`` (or ``deepspeed --module ...``): reward-weighted MLE on token rewards.

    L = mean over sequences of sum_t w_t * (-log pi(y_t | x, y_<t)),   w_t = g_t / sum_t' g_t'   (openrlhf_sepo/wmle.py)

OpenRLHF's ``train_sft`` with the flags that apply, same names and defaults, minus the tokenization flags
(``--data.input_key`` ... ``--data.tokenizer_chat_template``, ``--data.multiturn``, ``--data.dataset_split``,
``--data.dataset_probs``, ``--eval.split``, ``--use_ms``: the ids were fixed when the data was scored) and
``--model.pretrain_mode_enable`` (the weights live on response tokens), plus ``--wmle.*``. ``--data.dataset`` /
``--eval.dataset`` name ``score_tokens`` output dirs, comma-separated.
"""

import argparse
import sys

from openrlhf_sepo.cli.common import (add_actor_flags, check_packing, check_score_dirs, exit_on, parse_training_args,
                                      training_parser)
from openrlhf_sepo.wmle import SIDES, WEIGHTS


def build_parser() -> argparse.ArgumentParser:
    """The train_wmle argument parser (flat dotted names, as OpenRLHF's; ``hierarchize`` nests them)."""
    parser, add = training_parser(
        "train_wmle", __doc__, name="wmle", run_prefix="wmle", lr=5e-6, micro_batch_size=8, max_epochs=2, max_len=2048,
        model_help="the policy's start (e.g. the SFT model)", data_help="score_tokens output dir(s), comma-separated",
        eval_help="score_tokens output dir(s) for evaluation")

    # Reward-weighted MLE
    add("--wmle.side", type=str, default="chosen", choices=list(SIDES),
        help="which responses of the scores dir are trained on (with their token rewards)")
    add("--wmle.weight", type=str, default="reward", choices=list(WEIGHTS),
        help="g_t = r_t (reward: needs r_t >= 0, e.g. a learned token RM's rewards) or exp(r_t) (exp: any sign, "
             "e.g. the oracle/reference log-ratio)")
    add("--wmle.reward_to_go", action="store_true", default=False,
        help="replace r_t by sum_{t' >= t} r_t' before g")
    add_actor_flags(add)
    return parser


def parse_args(argv=None):
    """Parse and check everything that can be checked without a model, so bad input fails before training.

    The rows themselves (signs of the rewards included) are checked when the data loads, still before the model
    does."""
    parser = build_parser()
    args = parse_training_args(parser, argv, " (score_tokens output dir(s))")
    check_packing(parser, args)
    check_score_dirs(parser, args)
    return args


def weighted_dataset(args, tokenizer, strategy, evaluation=False):
    """The ``WeightedSFTDataset`` of ``--data.dataset`` (or ``--eval.dataset``) with the ``--wmle.*`` weights."""
    from openrlhf_sepo.training import data_source
    from openrlhf_sepo.wmle_data import WeightedSFTDataset

    spec, max_samples, _ = data_source(args, evaluation)
    return WeightedSFTDataset(spec, tokenizer, args.data.max_len, strategy, side=args.wmle.side,
                              weight=args.wmle.weight, reward_to_go=args.wmle.reward_to_go, max_samples=max_samples)


def wmle_trainer(args, **parts):
    from openrlhf_sepo.wmle_trainer import WeightedMLETrainer

    return WeightedMLETrainer(**parts, max_norm=args.max_norm, batch_size=args.train.batch_size,
                              max_epochs=args.train.max_epochs, save_hf_ckpt=args.ckpt.save_hf,
                              disable_ds_ckpt=args.ckpt.disable_ds)


def main(argv=None) -> int:
    """train_sft's run (``training.fit``) with a WeightedSFTDataset and a WeightedMLETrainer."""
    from openrlhf_sepo import training
    from openrlhf_sepo.scores_dir import ScoreDataError

    args = parse_args(argv)
    return exit_on(ScoreDataError, "train_wmle", lambda: training.fit(
        args, weighted_dataset, wmle_trainer, what="responses", error=ScoreDataError, sft_steps=True))


if __name__ == "__main__":
    sys.exit(main())
