"""``python -m openrlhf_sepo.cli.train_tkpo`` (or ``deepspeed --module ...``): TKPO, token-level preference
self-alignment for controllable generation: L = CE(y | x) + lambda * L_TKPO, the negatives sampled from the same model
on the prompt with its style attribute swapped (formulas in ``tkpo.py``).

OpenRLHF's ``train_sft`` with the flags that apply, same names and defaults (``--data.output_key`` is required:
TKPO needs a prompt and a response), minus ``--model.pretrain_mode_enable``, ``--data.multiturn``, packing and ring
attention, plus ``--tkpo.*``. The counterfactual prompt comes from a column (``--tkpo.counterfactual_key``) or from
an attribute column and a swap map (``--tkpo.attribute_key`` + ``--tkpo.swap_map``).
"""

import argparse
import sys

from openrlhf_sepo.cli.common import add_training_flags, load_actor, prepare_and_resume, setup_dataloaders
from openrlhf_sepo.tkpo import NEGATIVE_AGGREGATIONS


def build_parser() -> argparse.ArgumentParser:
    """The train_tkpo argument parser (flat dotted names, as OpenRLHF's; ``hierarchize`` nests them)."""
    parser = argparse.ArgumentParser(prog="train_tkpo", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add_training_flags(add, name="tkpo", run_prefix="tkpo", lr=5e-6, micro_batch_size=8, max_epochs=2, max_len=2048,
                       model_help="the model to train (a base or SFT model)",
                       data_help="SFT rows with a controllable attribute (OpenRLHF's syntax)",
                       eval_help="held-out rows: CE + lambda * L_TKPO")
    add("--ds.use_liger_kernel", action="store_true", default=False)
    # LoRA and 4-bit loading (OpenRLHF's, through its Actor)
    add("--ds.load_in_4bit", action="store_true", default=False)
    add("--ds.lora.rank", type=int, default=0)
    add("--ds.lora.alpha", type=int, default=16)
    add("--ds.lora.target_modules", type=str, nargs="*", default="all-linear")
    add("--ds.lora.dropout", type=float, default=0)

    # Data (train_sft's)
    add("--data.dataset_probs", type=str, default=None)
    add("--data.dataset_split", type=str, default="train")
    add("--eval.split", type=str, default="train")
    add("--data.input_key", type=str, default="input", help="the prompt column")
    add("--data.output_key", type=str, default=None, help="the response column (required)")
    add("--data.input_template", type=str, default="User: {}\nAssistant: ")
    add("--data.apply_chat_template", action="store_true", default=False)
    add("--data.tokenizer_chat_template", type=str, default=None)
    add("--use_ms", action="store_true", default=False)

    # TKPO (the released code's values)
    add("--tkpo.num_negatives", type=int, default=20, help="K: negatives per response token, sampled from q_t")
    add("--tkpo.tau", type=float, default=0.15, help="temperature on probabilities, > 0")
    add("--tkpo.lambda", dest="tkpo.lam", type=float, default=0.5, help="weight of L_TKPO beside the CE, >= 0")
    add("--tkpo.negatives_grad", action="store_true", default=False,
        help="let the gradient flow through the negatives' probabilities (the paper's figure and batched code); "
             "default: detached, as the released single-sample code")
    add("--tkpo.aggregation", type=str, default="log_mean", choices=list(NEGATIVE_AGGREGATIONS),
        help="log_mean: -log(mean_t r_t) (the released code); mean_log: mean_t(-log r_t)")
    add("--tkpo.counterfactual_key", type=str, default=None, help="column holding the counterfactual prompt x'")
    add("--tkpo.attribute_key", type=str, default=None, help="column holding the row's attribute (e.g. its style)")
    add("--tkpo.swap_map", type=str, default=None,
        help="JSON object (or a file holding one) mapping each attribute to its counterfactual, e.g. "
             "'{\"concise\": \"detailed\", \"detailed\": \"concise\"}'")
    add("--tkpo.chunk_size", type=int, default=1024, help="response positions per chunk of the TKPO term")
    return parser


def parse_args(argv=None):
    """Parse and check the flags before anything loads; ``args.tkpo.swap`` holds the parsed swap map (or None)."""
    from openrlhf.utils.config import hierarchize

    from openrlhf_sepo.tkpo_data import CounterfactualDataError, load_swap_map

    parser = build_parser()
    args = hierarchize(parser.parse_args(argv))
    if not args.model.model_name_or_path:
        parser.error("--model.model_name_or_path is required")
    if not args.data.dataset:
        parser.error("--data.dataset is required")
    if not args.data.output_key:
        parser.error("--data.output_key is required (TKPO trains a response to a prompt)")
    t = args.tkpo
    if bool(t.counterfactual_key) == bool(t.attribute_key):
        parser.error("give either --tkpo.counterfactual_key or --tkpo.attribute_key (with --tkpo.swap_map)")
    if t.attribute_key and not t.swap_map:
        parser.error("--tkpo.attribute_key needs --tkpo.swap_map")
    t.swap = None
    if t.swap_map:
        try:
            t.swap = load_swap_map(t.swap_map)
        except CounterfactualDataError as e:
            parser.error(str(e))
    if t.num_negatives < 1:
        parser.error(f"--tkpo.num_negatives must be >= 1, got {t.num_negatives}")
    if not t.tau > 0:
        parser.error(f"--tkpo.tau must be > 0, got {t.tau}")
    if t.lam < 0:
        parser.error(f"--tkpo.lambda must be >= 0, got {t.lam}")
    # OpenRLHF's SFTTrainer and Actor read these; this entrypoint offers none of them.
    args.ds.packing_samples, args.ds.ring_attn_size, args.ds.ring_attn_head_stride = False, 1, 1
    return args


def _rows(spec, probs, split, tokenizer, strategy, args, max_count, name):
    from openrlhf.datasets.utils import blending_datasets

    from openrlhf_sepo.tkpo_data import CounterfactualSFTDataset

    data = blending_datasets(spec, probs, strategy, args.train.seed, max_count=max_count, dataset_split=split)
    data = data.select(range(min(max_count, len(data))))
    return CounterfactualSFTDataset(data, tokenizer, args.data.max_len, strategy, args.tkpo.counterfactual_key,
                                    args.tkpo.attribute_key, args.tkpo.swap, name=name)


def train(args):
    """train_sft's wiring with a CounterfactualSFTDataset, a TKPOActor and a TKPOTrainer."""
    from openrlhf.utils import get_strategy, get_tokenizer

    from openrlhf_sepo.tkpo import TKPOLoss
    from openrlhf_sepo.tkpo_data import CounterfactualDataError
    from openrlhf_sepo.tkpo_trainer import TKPOActor, TKPOTrainer

    strategy = get_strategy(args)
    strategy.setup_distributed()
    tokenizer = get_tokenizer(args.model.model_name_or_path, None, "right", strategy,
                              use_fast=not args.data.disable_fast_tokenizer)
    train_dataset = _rows(args.data.dataset, args.data.dataset_probs, args.data.dataset_split, tokenizer, strategy,
                          args, args.data.max_samples, "--data.dataset")
    eval_dataset = None
    if args.eval.dataset:
        eval_dataset = _rows(args.eval.dataset, None, args.eval.split, tokenizer, strategy, args, 100000000,
                             "--eval.dataset")
    if len(train_dataset) < args.train.batch_size:
        raise CounterfactualDataError(f"{len(train_dataset)} training rows is fewer than one --train.batch_size "
                                      f"({args.train.batch_size})")

    model, tokenizer = load_actor(args, strategy, actor_class=TKPOActor)
    train_dataloader, eval_dataloader = setup_dataloaders(strategy, args, train_dataset, eval_dataset)
    # train_sft's step counts
    num_update_steps_per_epoch = max(1, len(train_dataloader) // strategy.accumulated_gradient)
    max_steps = len(train_dataloader) * args.train.max_epochs // strategy.accumulated_gradient
    model, optim, scheduler, consumed_samples = prepare_and_resume(strategy, model, args, max_steps,
                                                                   engine=lambda actor: actor.model)
    loss = TKPOLoss(num_negatives=args.tkpo.num_negatives, tau=args.tkpo.tau, aggregation=args.tkpo.aggregation,
                    negatives_grad=args.tkpo.negatives_grad, chunk_size=args.tkpo.chunk_size)
    trainer = TKPOTrainer(
        model=model, strategy=strategy, optim=optim, train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader, scheduler=scheduler, max_norm=args.max_norm,
        batch_size=args.train.batch_size, max_epochs=args.train.max_epochs, tokenizer=tokenizer,
        save_hf_ckpt=args.ckpt.save_hf, disable_ds_ckpt=args.ckpt.disable_ds,
        tkpo_loss=loss, lam=args.tkpo.lam, seed=args.train.seed,
    )
    trainer.fit(args, consumed_samples, num_update_steps_per_epoch)
    strategy.save_model(model, tokenizer, args.ckpt.output_dir)


def main(argv=None):
    from openrlhf_sepo.tkpo_data import CounterfactualDataError

    args = parse_args(argv)
    try:
        train(args)
    except CounterfactualDataError as e:  # bad data or too little of it: the message names the flag
        sys.exit(f"train_tkpo: error: {e}")


if __name__ == "__main__":
    main()
