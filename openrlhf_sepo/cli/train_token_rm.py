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
import math
import sys

from openrlhf_sepo.cli.common import add_training_flags, prepare_and_resume, setup_dataloaders
from openrlhf_sepo.token_rm import ACTIVATIONS, AGGREGATIONS, CONFIG_KEY


def build_parser() -> argparse.ArgumentParser:
    """The train_token_rm argument parser (flat dotted names, as OpenRLHF's; ``hierarchize`` nests them)."""
    parser = argparse.ArgumentParser(prog="train_token_rm", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add_training_flags(add, name="token_rm", run_prefix="token_rm", lr=9e-6, micro_batch_size=1, max_epochs=1,
                       max_len=512, model_help="backbone: a causal LM (e.g. the SFT model), or a train_token_rm "
                       "checkpoint to continue", data_help="ranked lists or preference pairs (OpenRLHF's syntax)",
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
    add("--data.dataset_probs", type=str, default=None)
    add("--data.dataset_split", type=str, default="train")
    add("--eval.split", type=str, default="train")
    add("--data.prompt_key", type=str, default=None)
    add("--data.chosen_key", type=str, default="chosen")
    add("--data.rejected_key", type=str, default="rejected")
    add("--data.responses_key", type=str, default="responses", help="ranked lists: the list of responses")
    add("--data.scores_key", type=str, default="scores", help="ranked lists: one preference score per response")
    add("--data.input_template", type=str, default=None)
    add("--data.apply_chat_template", action="store_true", default=False)
    add("--data.tokenizer_chat_template", type=str, default=None)

    # Loggers
    add("--use_ms", action="store_true", default=False)
    return parser


def parse_args(argv=None):
    """Parse and check what can be checked without a model, so bad flags fail before any model loads."""
    from openrlhf.utils.config import hierarchize

    parser = build_parser()
    args = hierarchize(parser.parse_args(argv))
    if not args.model.model_name_or_path:
        parser.error("--model.model_name_or_path is required")
    if not args.data.dataset:
        parser.error("--data.dataset is required (ranked lists or preference pairs)")
    if not args.token_rm.tau > 0:
        parser.error(f"--token_rm.tau must be > 0, got {args.token_rm.tau}")
    if args.data.input_template and "{}" not in args.data.input_template:
        parser.error(f"--data.input_template must contain '{{}}', got {args.data.input_template!r}")
    # OpenRLHF's RewardModelTrainer and strategy read these; this entrypoint offers none of them.
    args.ds.packing_samples, args.ds.ring_attn_size, args.ds.ring_attn_head_stride = False, 1, 1
    return args


def _lists(spec, probs, split, tokenizer, strategy, args, max_count, name):
    from openrlhf.datasets.utils import blending_datasets

    from openrlhf_sepo.token_rm_data import RankedListDataset

    data = blending_datasets(spec, probs, strategy, args.train.seed, max_count=max_count, dataset_split=split)
    data = data.select(range(min(max_count, len(data))))
    return RankedListDataset(data, tokenizer, strategy, seed=args.train.seed, name=name)


def train(args):
    """train_rm's wiring with a critic-type (every position) value-head model, ranked lists and ListMLE."""
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_strategy, get_tokenizer
    from transformers import AutoConfig

    from openrlhf_sepo.token_rm_data import ListDataError
    from openrlhf_sepo.token_rm_trainer import TokenRewardModelTrainer

    strategy = get_strategy(args)
    strategy.setup_distributed()
    use_fast = not args.data.disable_fast_tokenizer
    # Data before the model, so that a bad file or flag fails in seconds.
    tokenizer = get_tokenizer(args.model.model_name_or_path, None, "right", strategy, use_fast=use_fast)
    train_dataset = _lists(args.data.dataset, args.data.dataset_probs, args.data.dataset_split, tokenizer, strategy,
                           args, args.data.max_samples, "--data.dataset")
    eval_dataset = None
    if args.eval.dataset:
        eval_dataset = _lists(args.eval.dataset, None, args.eval.split, tokenizer, strategy, args, 100000000,
                              "--eval.dataset")
    num_update_steps_per_epoch = len(train_dataset) // args.train.batch_size
    if num_update_steps_per_epoch < 1:
        raise ListDataError(f"{len(train_dataset)} training lists is fewer than one --train.batch_size "
                         f"({args.train.batch_size})")

    # A train_token_rm checkpoint continues with its trained head (the on-policy loop retrains the token RM each
    # round); any other causal LM gets a fresh head, near zero.
    config = AutoConfig.from_pretrained(args.model.model_name_or_path, trust_remote_code=True)
    continuing = isinstance(getattr(config, CONFIG_KEY, None), dict)
    strategy.print(f"train_token_rm: {'continuing the token RM' if continuing else 'a new value head on'} "
                   f"{args.model.model_name_or_path}")
    model = get_llm_for_sequence_regression(
        args.model.model_name_or_path, "critic",
        attn_implementation=args.ds.attn_implementation,
        experts_implementation=args.ds.experts_implementation,
        param_dtype=args.ds.param_dtype,
        ds_config=strategy.get_ds_train_config(),
        init_value_head=not continuing,
        value_head_prefix=args.ds.value_head_prefix,
    )
    # In the config from the start, so that every HF save (--ckpt.save_hf, the final one) can be scored.
    model.config.value_head_prefix = model.value_head_prefix  # the flag's, or a continued checkpoint's own
    setattr(model.config, CONFIG_KEY, {"activation": args.token_rm.activation,
                                       "aggregation": args.token_rm.aggregation, "tau": args.token_rm.tau})
    tokenizer = get_tokenizer(args.model.model_name_or_path, model, "right", strategy, use_fast=use_fast)
    strategy.print(model)
    if args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant}
        )

    train_dataloader, eval_dataloader = setup_dataloaders(strategy, args, train_dataset, eval_dataset)
    max_steps = math.ceil(args.train.max_epochs * num_update_steps_per_epoch)
    model, optim, scheduler, consumed_samples = prepare_and_resume(strategy, model, args, max_steps)

    trainer = TokenRewardModelTrainer(
        model=model, strategy=strategy, optim=optim, train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader, scheduler=scheduler, tokenizer=tokenizer,
        activation=args.token_rm.activation, aggregation=args.token_rm.aggregation, tau=args.token_rm.tau,
        max_norm=args.max_norm, max_epochs=args.train.max_epochs, save_hf_ckpt=args.ckpt.save_hf,
        disable_ds_ckpt=args.ckpt.disable_ds,
    )
    trainer.fit(args, consumed_samples, num_update_steps_per_epoch)
    strategy.save_model(model, tokenizer, args.ckpt.output_dir)


def main(argv=None):
    args = parse_args(argv)
    from openrlhf_sepo.token_rm_data import ListDataError

    try:
        train(args)
    except ListDataError as e:  # bad data or too little of it: the message names the flag
        sys.exit(f"train_token_rm: error: {e}")


if __name__ == "__main__":
    main()
