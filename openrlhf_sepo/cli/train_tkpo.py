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

from openrlhf_sepo.cli.common import (add_data_file_flags, add_lora_flags, add_template_flags, check_positive, exit_on,
                                      parse_training_args, training_parser)
from openrlhf_sepo.openrlhf_internals import NO_PACKING_FLAGS, add_missing_flags
from openrlhf_sepo.tkpo import NEGATIVE_AGGREGATIONS


def build_parser() -> argparse.ArgumentParser:
    """The train_tkpo argument parser (flat dotted names, as OpenRLHF's; ``hierarchize`` nests them)."""
    parser, add = training_parser(
        "train_tkpo", __doc__, name="tkpo", run_prefix="tkpo", lr=5e-6, micro_batch_size=8, max_epochs=2, max_len=2048,
        model_help="the model to train (a base or SFT model)",
        data_help="SFT rows with a controllable attribute (OpenRLHF's syntax)",
        eval_help="held-out rows: CE + lambda * L_TKPO")
    add_lora_flags(add)

    # Data (train_sft's)
    add_data_file_flags(add)
    add("--data.input_key", type=str, default="input", help="the prompt column")
    add("--data.output_key", type=str, default=None, help="the response column (required)")
    add_template_flags(add, input_template="User: {}\nAssistant: ")
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
    from openrlhf_sepo.tkpo_data import CounterfactualDataError, load_swap_map

    parser = build_parser()
    args = parse_training_args(parser, argv)
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
    check_positive(parser, "--tkpo.tau", t.tau)
    if t.lam < 0:
        parser.error(f"--tkpo.lambda must be >= 0, got {t.lam}")
    add_missing_flags(args.ds, NO_PACKING_FLAGS, overwrite=True)  # OpenRLHF reads them; this entrypoint has none
    return args


def counterfactual_dataset(args, tokenizer, strategy, evaluation=False):
    """The ``CounterfactualSFTDataset`` of ``--data.dataset`` (or ``--eval.dataset``) with the ``--tkpo.*`` swap."""
    from openrlhf_sepo.tkpo_data import CounterfactualSFTDataset
    from openrlhf_sepo.training import blended_rows

    rows, name = blended_rows(args, strategy, evaluation)
    return CounterfactualSFTDataset(rows, tokenizer, args.data.max_len, strategy, args.tkpo.counterfactual_key,
                                    args.tkpo.attribute_key, args.tkpo.swap, name=name)


def tkpo_trainer(args, **parts):
    from openrlhf_sepo.tkpo import TKPOLoss
    from openrlhf_sepo.tkpo_trainer import TKPOTrainer

    loss = TKPOLoss(num_negatives=args.tkpo.num_negatives, tau=args.tkpo.tau, aggregation=args.tkpo.aggregation,
                    negatives_grad=args.tkpo.negatives_grad, chunk_size=args.tkpo.chunk_size)
    return TKPOTrainer(**parts, max_norm=args.max_norm, batch_size=args.train.batch_size,
                       max_epochs=args.train.max_epochs, save_hf_ckpt=args.ckpt.save_hf,
                       disable_ds_ckpt=args.ckpt.disable_ds, tkpo_loss=loss, lam=args.tkpo.lam, seed=args.train.seed)


def main(argv=None) -> int:
    """train_sft's run (``training.fit``) with a CounterfactualSFTDataset, a TKPOActor and a TKPOTrainer."""
    from openrlhf_sepo import training
    from openrlhf_sepo.tkpo_data import CounterfactualDataError
    from openrlhf_sepo.tkpo_trainer import TKPOActor

    args = parse_args(argv)
    return exit_on(CounterfactualDataError, "train_tkpo", lambda: training.fit(
        args, counterfactual_dataset, tkpo_trainer, what="rows", error=CounterfactualDataError, sft_steps=True,
        actor_class=TKPOActor))


if __name__ == "__main__":
    sys.exit(main())
