"""``python -m openrlhf_sepo.cli.train_sepo`` (or ``deepspeed --module ...``): SePO policy training.

OpenRLHF's ``train_dpo`` with the flags that apply, same names and defaults (but ``--model.nll_loss_coef``, 1 here:
see its comment), minus the reference model
(``--ref.*``), the DPO loss flags (``--model.beta``, ``--model.ipo_enable``, ``--model.label_smoothing``) and the
tokenization flags (``--data.prompt_key`` ... ``--data.tokenizer_chat_template``, ``--data.dataset_split``,
``--data.dataset_probs``, ``--eval.split``, ``--use_ms``: the ids were fixed when the data was scored), plus
``--sepo.*``. ``--data.dataset`` / ``--eval.dataset`` name ``score_tokens`` output dirs, comma-separated.
"""

import argparse
import math
import sys

from openrlhf_sepo.cli.common import add_training_flags, load_actor, prepare_and_resume, setup_dataloaders
from openrlhf_sepo.datasets import SELECTION_MODES, ScoreDataError, TokenScoreDataset, read_manifest


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
    parser = argparse.ArgumentParser(prog="train_sepo", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add_training_flags(add, name="sepo", run_prefix="exp", lr=1e-5, micro_batch_size=8, max_epochs=1, max_len=512,
                       model_help="the policy's start (e.g. the SFT model)",
                       data_help="score_tokens output dir(s), comma-separated",
                       eval_help="score_tokens output dir(s) for evaluation")
    add("--ds.use_liger_kernel", action="store_true", default=False)

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
    """Parse and check everything that can be checked without a model, so bad input fails before training."""
    from openrlhf.utils.config import hierarchize

    parser = build_parser()
    flat = parser.parse_args(argv)
    args = hierarchize(flat)
    if not args.model.model_name_or_path:
        parser.error("--model.model_name_or_path is required")
    if not args.data.dataset:
        parser.error("--data.dataset is required (score_tokens output dir(s))")
    if not args.sepo.beta > 0:
        parser.error(f"--sepo.beta must be > 0, got {args.sepo.beta}")
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


def _score_dataset(spec, tokenizer, strategy, args, max_samples):
    return TokenScoreDataset(
        spec, tokenizer, args.data.max_len, strategy,
        k_chosen=args.sepo.k_chosen, k_rejected=args.sepo.k_rejected, selection=args.sepo.selection,
        max_samples=max_samples, exclude_common_prefix=args.sepo.exclude_common_prefix, seed=args.train.seed,
    )


def train(args):
    """train_dpo's wiring with a TokenScoreDataset, a SelectiveDPOTrainer and no reference model.

    The data is loaded before the model, so a tokenizer mismatch or a bad row fails in seconds.
    """
    from openrlhf.utils import get_strategy, get_tokenizer

    from openrlhf_sepo.trainer import SelectiveDPOTrainer

    strategy = get_strategy(args)
    strategy.setup_distributed()

    use_fast = not args.data.disable_fast_tokenizer
    tokenizer = get_tokenizer(args.model.model_name_or_path, None, "right", strategy, use_fast=use_fast)
    train_dataset = _score_dataset(args.data.dataset, tokenizer, strategy, args, args.data.max_samples)
    eval_dataset = _score_dataset(args.eval.dataset, tokenizer, strategy, args, 100000000) if args.eval.dataset else None
    num_update_steps_per_epoch = len(train_dataset) // args.train.batch_size
    if num_update_steps_per_epoch < 1:
        raise ScoreDataError(
            f"{len(train_dataset)} training pairs is fewer than one --train.batch_size ({args.train.batch_size})"
        )

    model, tokenizer = load_actor(args, strategy)

    train_dataloader, eval_dataloader = setup_dataloaders(strategy, args, train_dataset, eval_dataset)
    max_steps = math.ceil(args.train.max_epochs * num_update_steps_per_epoch)
    model, optim, scheduler, consumed_samples = prepare_and_resume(strategy, model, args, max_steps,
                                                                   engine=lambda actor: actor.model)

    trainer = SelectiveDPOTrainer(
        model=model,
        strategy=strategy,
        tokenizer=tokenizer,
        optim=optim,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        scheduler=scheduler,
        max_norm=args.max_norm,
        beta=args.sepo.beta,
        gamma=args.sepo.gamma,
        full_logits=args.sepo.full_logits,
        max_epochs=args.train.max_epochs,
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
        sys.exit(f"train_sepo: error: {e}")


if __name__ == "__main__":
    main()
