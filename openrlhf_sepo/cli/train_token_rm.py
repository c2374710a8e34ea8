"""``python -m openrlhf_sepo.cli.train_token_rm`` (or ``deepspeed --module ...``): a token-level reward model
learned from ranked lists with ListMLE (preference-grounded token-level guidance; formulas in ``token_rm.py``).

OpenRLHF's ``train_rm`` with the flags that apply, same names and defaults, minus the pairwise-loss flags
(``--model.loss_type``, ``--model.margin_loss_enable``, ``--model.compute_fp32_loss_enable``) and packing, ring
attention, LoRA and 4-bit loading (not supported by the per-position forward here), plus ``--token_rm.*`` and the
ranked-list columns ``--data.responses_key`` / ``--data.scores_key``. ``--data.dataset`` / ``--eval.dataset``
hold ranked lists or ordinary preference pairs (lists of two); responses are tokenized as ``train_dpo`` tokenizes
a chosen response. The saved model is OpenRLHF's critic-type value-head model; its config records
``value_head_prefix`` and ``token_rm`` (activation, aggregation, tau), which ``score_tokens --scorer token_rm``
reads. Given such a checkpoint as ``--model.model_name_or_path``, training continues from its trained head.
"""

import argparse
import sys

from openrlhf_sepo.cli.common import (add_data_file_flags, add_template_flags, check_positive, exit_on,
                                      parse_training_args, training_parser)
from openrlhf_sepo.openrlhf_internals import NO_PACKING_FLAGS, add_missing_flags
from openrlhf_sepo.token_rm import ACTIVATIONS, AGGREGATIONS


def build_parser() -> argparse.ArgumentParser:
    """The train_token_rm argument parser (flat dotted names, as OpenRLHF's; ``hierarchize`` nests them)."""
    parser, add = training_parser(
        "train_token_rm", __doc__, liger=False, name="token_rm", run_prefix="token_rm", lr=9e-6, micro_batch_size=1,
        max_epochs=1, max_len=512,
        model_help="backbone: a causal LM (e.g. the SFT model), or a train_token_rm checkpoint to continue",
        data_help="ranked lists or preference pairs (OpenRLHF's syntax)",
        eval_help="held-out lists: ranking accuracy, Kendall tau, ListMLE")

    # Model
    add("--ds.value_head_prefix", type=str, default="score")

    # Token reward model
    add("--token_rm.activation", type=str, default="softplus", choices=list(ACTIVATIONS),
        help="r = softplus(1 - softplus(1 - z)) in (0, 1.31), or sigmoid(z) in (0, 1)")
    add("--token_rm.aggregation", type=str, default="avg", choices=list(AGGREGATIONS),
        help="sequence score from token rewards: avg (Lbar * mean), sum, softmax / softmin (Lbar * soft max / min)")
    add("--token_rm.tau", type=float, default=2.0, help="temperature of softmax / softmin, > 0")

    # Data: ranked lists (prompt, responses, scores) or preference pairs (chosen, rejected)
    add_data_file_flags(add)
    add("--data.prompt_key", type=str, default=None)
    add("--data.chosen_key", type=str, default="chosen")
    add("--data.rejected_key", type=str, default="rejected")
    add("--data.responses_key", type=str, default="responses", help="ranked lists: the list of responses")
    add("--data.scores_key", type=str, default="scores", help="ranked lists: one preference score per response")
    add_template_flags(add, input_template=None)

    # Loggers
    add("--use_ms", action="store_true", default=False)
    return parser


def parse_args(argv=None):
    """Parse and check what can be checked without a model, so bad flags fail before any model loads."""
    parser = build_parser()
    args = parse_training_args(parser, argv, " (ranked lists or preference pairs)")
    check_positive(parser, "--token_rm.tau", args.token_rm.tau)
    if args.data.input_template and "{}" not in args.data.input_template:
        parser.error(f"--data.input_template must contain '{{}}', got {args.data.input_template!r}")
    add_missing_flags(args.ds, NO_PACKING_FLAGS, overwrite=True)  # OpenRLHF reads them; this entrypoint has none
    return args


def list_dataset(args, tokenizer, strategy, evaluation=False):
    """The ``RankedListDataset`` of ``--data.dataset`` (or ``--eval.dataset``)."""
    from openrlhf_sepo.token_rm_data import RankedListDataset
    from openrlhf_sepo.training import blended_rows

    rows, name = blended_rows(args, strategy, evaluation)
    return RankedListDataset(rows, tokenizer, strategy, seed=args.train.seed, name=name)


def token_rm_trainer(args, **parts):
    from openrlhf_sepo.token_rm_trainer import TokenRewardModelTrainer

    return TokenRewardModelTrainer(**parts, activation=args.token_rm.activation,
                                   aggregation=args.token_rm.aggregation, tau=args.token_rm.tau,
                                   max_norm=args.max_norm, max_epochs=args.train.max_epochs,
                                   save_hf_ckpt=args.ckpt.save_hf, disable_ds_ckpt=args.ckpt.disable_ds)


def main(argv=None) -> int:
    """train_rm's run (``training.fit``) with a critic-type (every position) value-head model, ranked lists and
    ListMLE."""
    from openrlhf_sepo import token_rm_trainer as trainer, training
    from openrlhf_sepo.token_rm_data import ListDataError

    args = parse_args(argv)
    return exit_on(ListDataError, "train_token_rm", lambda: training.fit(
        args, list_dataset, token_rm_trainer, what="lists", error=ListDataError, load_model=trainer.load_for_training,
        engine=lambda model: model))


if __name__ == "__main__":
    sys.exit(main())
