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

from openrlhf_sepo.cli.common import add_training_flags, load_actor, prepare_and_resume, setup_dataloaders
from openrlhf_sepo.datasets import ScoreDataError, read_manifest
from openrlhf_sepo.wmle import SIDES, WEIGHTS, WeightedSFTDataset


def build_parser() -> argparse.ArgumentParser:
    """The train_wmle argument parser (flat dotted names, as OpenRLHF's; ``hierarchize`` nests them)."""
    parser = argparse.ArgumentParser(prog="train_wmle", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add_training_flags(add, name="wmle", run_prefix="wmle", lr=5e-6, micro_batch_size=8, max_epochs=2, max_len=2048,
                       model_help="the policy's start (e.g. the SFT model)",
                       data_help="score_tokens output dir(s), comma-separated",
                       eval_help="score_tokens output dir(s) for evaluation")

    # DeepSpeed
    add("--ds.use_liger_kernel", action="store_true", default=False)

    # Reward-weighted MLE
    add("--wmle.side", type=str, default="chosen", choices=list(SIDES),
        help="which responses of the scores dir are trained on (with their token rewards)")
    add("--wmle.weight", type=str, default="reward", choices=list(WEIGHTS),
        help="g_t = r_t (reward: needs r_t >= 0, e.g. a learned token RM's rewards) or exp(r_t) (exp: any sign, "
             "e.g. the oracle/reference log-ratio)")
    add("--wmle.reward_to_go", action="store_true", default=False,
        help="replace r_t by sum_{t' >= t} r_t' before g")

    # Context parallel, LoRA, packing (OpenRLHF's, through its Actor)
    add("--ds.ring_attn_size", type=int, default=1)
    add("--ds.ring_attn_head_stride", type=int, default=1)
    add("--ds.load_in_4bit", action="store_true", default=False)
    add("--ds.lora.rank", type=int, default=0)
    add("--ds.lora.alpha", type=int, default=16)
    add("--ds.lora.target_modules", type=str, nargs="*", default="all-linear")
    add("--ds.lora.dropout", type=float, default=0)
    add("--ds.packing_samples", action="store_true", default=False)
    return parser


def parse_args(argv=None):
    """Parse and check everything that can be checked without a model, so bad input fails before training.

    The rows themselves (signs of the rewards included) are checked in ``train`` when the data loads, still before
    the model does."""
    from openrlhf.utils.config import hierarchize

    parser = build_parser()
    args = hierarchize(parser.parse_args(argv))
    if not args.model.model_name_or_path:
        parser.error("--model.model_name_or_path is required")
    if not args.data.dataset:
        parser.error("--data.dataset is required (score_tokens output dir(s))")
    if args.ds.ring_attn_size > 1 and not args.ds.packing_samples:
        parser.error("--ds.ring_attn_size > 1 needs --ds.packing_samples")
    for flag, spec in (("--data.dataset", args.data.dataset), ("--eval.dataset", args.eval.dataset)):
        for score_dir in (spec or "").split(","):
            if score_dir.strip():
                try:
                    read_manifest(score_dir.strip())
                except ScoreDataError as e:
                    parser.error(f"{flag}: {e}")
    return args


def _weighted_dataset(spec, tokenizer, strategy, args, max_samples):
    return WeightedSFTDataset(
        spec, tokenizer, args.data.max_len, strategy, side=args.wmle.side, weight=args.wmle.weight,
        reward_to_go=args.wmle.reward_to_go, max_samples=max_samples,
    )


def train(args):
    """train_sft's wiring with a WeightedSFTDataset and a WeightedMLETrainer.

    The data is loaded before the model, so a tokenizer mismatch or a bad row fails in seconds.
    """
    from openrlhf.utils import get_strategy, get_tokenizer

    from openrlhf_sepo.wmle import WeightedMLETrainer

    strategy = get_strategy(args)
    strategy.setup_distributed()

    use_fast = not args.data.disable_fast_tokenizer
    tokenizer = get_tokenizer(args.model.model_name_or_path, None, "right", strategy, use_fast=use_fast)
    train_dataset = _weighted_dataset(args.data.dataset, tokenizer, strategy, args, args.data.max_samples)
    eval_dataset = None
    if args.eval.dataset:
        eval_dataset = _weighted_dataset(args.eval.dataset, tokenizer, strategy, args, 100000000)
    if len(train_dataset) < args.train.batch_size:
        raise ScoreDataError(
            f"{len(train_dataset)} training responses is fewer than one --train.batch_size ({args.train.batch_size})"
        )

    model, tokenizer = load_actor(args, strategy)

    train_dataloader, eval_dataloader = setup_dataloaders(strategy, args, train_dataset, eval_dataset)
    # train_sft's step counts
    num_update_steps_per_epoch = max(1, len(train_dataloader) // strategy.accumulated_gradient)
    max_steps = len(train_dataloader) * args.train.max_epochs // strategy.accumulated_gradient
    model, optim, scheduler, consumed_samples = prepare_and_resume(strategy, model, args, max_steps,
                                                                   engine=lambda actor: actor.model)

    trainer = WeightedMLETrainer(
        model=model,
        strategy=strategy,
        optim=optim,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        scheduler=scheduler,
        max_norm=args.max_norm,
        batch_size=args.train.batch_size,
        max_epochs=args.train.max_epochs,
        tokenizer=tokenizer,
        save_hf_ckpt=args.ckpt.save_hf,
        disable_ds_ckpt=args.ckpt.disable_ds,
    )
    trainer.fit(args, consumed_samples, num_update_steps_per_epoch)
    strategy.save_model(model, tokenizer, args.ckpt.output_dir)


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except ScoreDataError as e:
        sys.exit(f"train_wmle: error: {e}")


if __name__ == "__main__":
    main()
