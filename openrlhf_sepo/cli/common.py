"""What the package's trainers' front doors (``train_sepo``, ``train_wmle``, ``train_token_rm``, ``train_tkpo``) share
with OpenRLHF's ``train_*`` entrypoints: the checkpoint, DeepSpeed, optimizer, scheduler and logger flags (OpenRLHF's
names; the defaults that differ between OpenRLHF's entrypoints are arguments), the flag groups some of them take
(LoRA, packing, OpenRLHF's data-file flags), the checks every one makes, and the exit on a data error. The run itself
is ``openrlhf_sepo.training.fit``."""

import argparse
import sys
from datetime import datetime


def training_parser(prog: str, doc: str, liger: bool = True, **training_defaults):
    """(parser, its ``add_argument``): an entrypoint's parser (``prog``, described by ``doc``'s first line) with
    ``add_training_flags(**training_defaults)``, then ``--ds.use_liger_kernel`` with ``liger``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add = parser.add_argument
    add_training_flags(add, **training_defaults)
    if liger:
        add("--ds.use_liger_kernel", action="store_true", default=False)
    return parser, add


def add_training_flags(add, *, name: str, run_prefix: str, lr: float, micro_batch_size: int, max_epochs: int,
                       max_len: int, model_help: str, data_help: str, eval_help: str):
    """Add the flags every trainer here takes, as ``openrlhf.cli.train_*`` define them. ``add`` is a parser's
    ``add_argument``; ``name`` names the default checkpoint dir and wandb project (``checkpoints_<name>``,
    ``openrlhf_train_<name>``), ``run_prefix`` the wandb run name; the rest are the defaults of the OpenRLHF
    entrypoint each one follows."""
    # Checkpoints
    add("--ckpt.output_dir", type=str, default="./ckpt")
    add("--ckpt.save_steps", type=int, default=-1)
    add("--ckpt.save_hf", action="store_true", default=False)
    add("--ckpt.disable_ds", action="store_true", default=False)
    add("--logger.logging_steps", type=int, default=1)
    add("--eval.steps", type=int, default=-1)
    add("--ckpt.path", type=str, default=f"./ckpt/checkpoints_{name}")
    add("--ckpt.max_num", type=int, default=3)
    add("--ckpt.max_mem", type=int, default=int(1e8))
    add("--ckpt.load_enable", action="store_true", default=False)
    add("--ds.use_universal_ckpt", action="store_true", default=False)

    # DeepSpeed
    add("--train.micro_batch_size", type=int, default=micro_batch_size, help="batch size per GPU")
    add("--train.batch_size", type=int, default=128, help="Global training batch size")
    add("--model.gradient_checkpointing_enable", action="store_true", default=False)
    add("--ds.deepcompile", action="store_true", default=False)
    add("--train.seed", type=int, default=42)
    add("--train.full_determinism_enable", action="store_true", default=False)
    add("--data.disable_fast_tokenizer", action="store_true", default=False)
    add("--data.dataloader_num_workers", type=int, default=0)
    add("--local_rank", type=int, default=-1, help="local_rank for deepspeed")
    add("--ds.zero_stage", type=int, default=2)
    add("--ds.param_dtype", type=str, default="bf16", choices=["bf16", "fp16"])
    add("--ds.zpg", type=int, default=1, help="ZeRO++ max partition size")
    add("--ds.adam_offload", action="store_true", default=False)
    add("--ds.attn_implementation", type=str, default="flash_attention_2")
    add("--ds.experts_implementation", type=str, default=None, choices=["eager", "batched_mm", "grouped_mm", "deepgemm"])
    add("--ds.grad_accum_dtype", type=str, default=None)
    add("--ds.overlap_comm", action="store_true", default=False)
    add("--model.gradient_checkpointing_reentrant", action="store_true", default=False)
    add("--ds.tensor_parallel_size", type=int, default=1)
    add("--train.max_epochs", type=int, default=max_epochs)
    add("--model.aux_loss_coef", type=float, default=0, help="MoE balancing loss")

    # Optimizer + scheduler + grad clip
    add("--optim", type=str, default="adam", choices=["adam", "muon"])
    add("--muon.lr", type=float, default=0.02)
    add("--muon.momentum", type=float, default=0.95)
    add("--muon.ns_steps", type=int, default=5)
    add("--muon.nesterov", action="store_true", default=True)
    add("--muon.no_nesterov", dest="muon.nesterov", action="store_false")
    add("--adam.lr", type=float, default=lr)
    add("--adam.betas", type=float, nargs=2, default=(0.9, 0.95))
    add("--adam.eps", type=float, default=1e-8)
    add("--adam.weight_decay", type=float, default=0.0)
    add("--lr_scheduler", type=str, default="cosine_with_min_lr")
    add("--lr_warmup_ratio", type=float, default=0.03)
    add("--min_lr_ratio", type=float, default=0.1)
    add("--max_norm", type=float, default=1.0, help="Gradient clipping")

    # Model and data
    add("--model.model_name_or_path", type=str, default=None, help=model_help)
    add("--data.dataset", type=str, default=None, help=data_help)
    add("--eval.dataset", type=str, default=None, help=eval_help)
    add("--data.max_samples", type=int, default=1000000)
    add("--data.max_len", type=int, default=max_len)

    # Loggers
    add("--logger.wandb.key", type=str, default=None)
    add("--logger.wandb.org", type=str, default=None)
    add("--logger.wandb.group", type=str, default=None)
    add("--logger.wandb.project", type=str, default=f"openrlhf_train_{name}")
    add("--logger.wandb.run_name", type=str, default=f"{run_prefix}_%s" % datetime.now().strftime("%m%dT%H:%M"))
    add("--logger.tensorboard_dir", type=str, default=None)


def add_lora_flags(add):
    """4-bit loading and LoRA (OpenRLHF's, through its ``Actor``)."""
    add("--ds.load_in_4bit", action="store_true", default=False)
    add("--ds.lora.rank", type=int, default=0)
    add("--ds.lora.alpha", type=int, default=16)
    add("--ds.lora.target_modules", type=str, nargs="*", default="all-linear")
    add("--ds.lora.dropout", type=float, default=0)


def add_actor_flags(add):
    """Context parallel, LoRA, packing (OpenRLHF's, through its ``Actor``), in ``train_dpo``'s order."""
    add("--ds.ring_attn_size", type=int, default=1)
    add("--ds.ring_attn_head_stride", type=int, default=1)
    add_lora_flags(add)
    add("--ds.packing_samples", action="store_true", default=False)


def add_data_file_flags(add):
    """How OpenRLHF's ``blending_datasets`` reads ``--data.dataset`` / ``--eval.dataset``."""
    add("--data.dataset_probs", type=str, default=None)
    add("--data.dataset_split", type=str, default="train")
    add("--eval.split", type=str, default="train")


def add_template_flags(add, input_template):
    """How OpenRLHF's data sets make a prompt: ``--data.input_template`` (default ``input_template``), the chat
    template."""
    add("--data.input_template", type=str, default=input_template)
    add("--data.apply_chat_template", action="store_true", default=False)
    add("--data.tokenizer_chat_template", type=str, default=None)


def parse_training_args(parser, argv, data_required: str = ""):
    """The nested args (OpenRLHF's ``hierarchize``) of ``argv``; ``--model.model_name_or_path`` and
    ``--data.dataset`` required (``data_required``: what the error adds about the latter)."""
    from openrlhf.utils.config import hierarchize

    args = hierarchize(parser.parse_args(argv))
    if not args.model.model_name_or_path:
        parser.error("--model.model_name_or_path is required")
    if not args.data.dataset:
        parser.error(f"--data.dataset is required{data_required}")
    return args


def check_positive(parser, flag: str, value) -> None:
    if not value > 0:
        parser.error(f"{flag} must be > 0, got {value}")


def check_packing(parser, args):
    if args.ds.ring_attn_size > 1 and not args.ds.packing_samples:
        parser.error("--ds.ring_attn_size > 1 needs --ds.packing_samples")


def check_score_dirs(parser, args, flags=("--data.dataset", "--eval.dataset")):
    """Every dir of ``--data.dataset`` / ``--eval.dataset`` (comma-separated; those of ``flags``) is a readable
    scores dir."""
    from openrlhf_sepo.scores_dir import ScoreDataError, read_manifest

    for flag, spec in (("--data.dataset", args.data.dataset), ("--eval.dataset", args.eval.dataset)):
        if flag not in flags:
            continue
        for score_dir in (spec or "").split(","):
            if score_dir.strip():
                try:
                    read_manifest(score_dir.strip())
                except ScoreDataError as e:
                    parser.error(f"{flag}: {e}")


def exit_on(errors, prog: str, call) -> int:
    """``call()``; 0, or 1 with ``<prog>: error: <message>`` on stderr when it raises one of ``errors`` (bad data
    or too little of it: the message names the flag)."""
    try:
        call()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
