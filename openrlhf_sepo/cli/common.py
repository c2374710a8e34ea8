"""What the package's trainers (``train_sepo``, ``train_wmle``, ``train_token_rm``, ``train_tkpo``) share with OpenRLHF's
``train_*`` entrypoints: the checkpoint, DeepSpeed, optimizer, scheduler and logger flags (OpenRLHF's names; the
defaults that differ between OpenRLHF's entrypoints are arguments), the policy model of those that train one, the
dataloaders, and the optimizer set-up with resume from an OpenRLHF checkpoint."""

import os
from datetime import datetime


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


def load_actor(args, strategy, actor_class=None):
    """(OpenRLHF ``Actor`` (or ``actor_class``, a subclass) built from the ``--model.*`` / ``--ds.*`` flags as
    ``train_dpo`` and ``train_sft`` build it, its tokenizer (right padding)); gradient checkpointing on with
    ``--model.gradient_checkpointing_enable``."""
    from openrlhf.models import Actor
    from openrlhf.utils import get_tokenizer

    model = (actor_class or Actor)(
        args.model.model_name_or_path,
        attn_implementation=args.ds.attn_implementation,
        experts_implementation=args.ds.experts_implementation,
        param_dtype=args.ds.param_dtype,
        load_in_4bit=args.ds.load_in_4bit,
        lora_rank=args.ds.lora.rank,
        lora_alpha=args.ds.lora.alpha,
        lora_dropout=args.ds.lora.dropout,
        target_modules=args.ds.lora.target_modules,
        ds_config=strategy.get_ds_train_config(),
        packing_samples=args.ds.packing_samples,
        use_liger_kernel=args.ds.use_liger_kernel,
    )
    tokenizer = get_tokenizer(args.model.model_name_or_path, model.model, "right", strategy,
                              use_fast=not args.data.disable_fast_tokenizer)
    strategy.print(model)
    if args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant}
        )
    return model, tokenizer


def setup_dataloaders(strategy, args, train_dataset, eval_dataset=None):
    """(train, eval) dataloaders as OpenRLHF's entrypoints build them (eval: in order, last batch kept; None
    without an eval data set)."""
    train = strategy.setup_dataloader(train_dataset, args.train.micro_batch_size, True, True,
                                      train_dataset.collate_fn, num_workers=args.data.dataloader_num_workers)
    if eval_dataset is None:
        return train, None
    return train, strategy.setup_dataloader(eval_dataset, args.train.micro_batch_size, True, False,
                                            eval_dataset.collate_fn, drop_last=False,
                                            num_workers=args.data.dataloader_num_workers)


def prepare_and_resume(strategy, model, args, max_steps, engine=lambda prepared: prepared):
    """(model, optimizer, scheduler, consumed_samples): OpenRLHF's optimizer and scheduler for ``max_steps`` through
    ``strategy.prepare``, then, with ``--ckpt.load_enable``, the latest checkpoint under ``--ckpt.path`` loaded into
    ``engine(model)`` (the DeepSpeed engine: ``Actor.model`` for an Actor, the model itself otherwise)."""
    cfg = dict(optim=args.optim, muon=vars(args.muon), adam=vars(args.adam), lr_scheduler=args.lr_scheduler,
               lr_warmup_ratio=args.lr_warmup_ratio, min_lr_ratio=args.min_lr_ratio, max_norm=args.max_norm,
               scheduler_steps=max_steps)
    model, optim, scheduler = strategy.prepare((model, cfg))
    consumed_samples = 0
    if args.ckpt.load_enable and os.path.exists(args.ckpt.path):
        load_path, states = strategy.load_ckpt(engine(model), args.ckpt.path)
        if load_path is not None:
            consumed_samples = states["consumed_samples"]
            strategy.print(f"Loaded the checkpoint: {args.ckpt.path}, consumed_samples: {consumed_samples}")
    os.makedirs(args.ckpt.output_dir, exist_ok=True)
    return model, optim, scheduler, consumed_samples
