"""The run every trainer here shares with OpenRLHF's ``train_*`` entrypoints, as one function: ``fit``.

    strategy -> tokenizer -> train / eval data sets -> (too little data: stop) -> model -> dataloaders
    -> optimizer, scheduler, resume (``strategy.prepare``) -> the method's trainer -> ``fit`` -> save

The data loads before the model, so a bad row, a tokenizer mismatch or a flag naming a missing column fails in
seconds. What differs between methods is passed in: the data set and trainer builders, the model loader (OpenRLHF's
``Actor`` by default), and whether the step counts are ``train_dpo``'s / ``train_rm``'s (per sample) or
``train_sft``'s (per dataloader batch). ``cli/train_<method>.py`` parse the flags and call ``fit``.
"""

import math
import os

EVAL_MAX_SAMPLES = 100000000  # OpenRLHF's entrypoints read every evaluation row


def setup_strategy(args):
    """OpenRLHF's ``DeepspeedStrategy`` for ``args``, its distributed backend initialised (seeds set)."""
    from openrlhf.utils import get_strategy

    strategy = get_strategy(args)
    strategy.setup_distributed()
    return strategy


def enable_gradient_checkpointing(model, args) -> None:
    """``--model.gradient_checkpointing_enable`` (``--model.gradient_checkpointing_reentrant``), as OpenRLHF does."""
    if args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant}
        )


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
    enable_gradient_checkpointing(model, args)
    return model, tokenizer


def data_source(args, evaluation: bool):
    """(data set spec, sample cap, the flag that names it) of the training (``--data.dataset``) or evaluation
    (``--eval.dataset``) data."""
    if evaluation:
        return args.eval.dataset, EVAL_MAX_SAMPLES, "--eval.dataset"
    return args.data.dataset, args.data.max_samples, "--data.dataset"


def blended_rows(args, strategy, evaluation: bool):
    """(rows, the flag that names them): ``--data.dataset`` (with ``--data.dataset_probs``, ``--data.dataset_split``,
    ``--data.max_samples``) or ``--eval.dataset`` (``--eval.split``), read by OpenRLHF's ``blending_datasets`` as
    ``train_sft`` / ``train_rm`` read them."""
    from openrlhf.datasets.utils import blending_datasets

    spec, max_count, name = data_source(args, evaluation)
    probs, split = (None, args.eval.split) if evaluation else (args.data.dataset_probs, args.data.dataset_split)
    rows = blending_datasets(spec, probs, strategy, args.train.seed, max_count=max_count, dataset_split=split)
    return rows.select(range(min(max_count, len(rows)))), name


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


def step_counts(args, strategy, train_dataset, train_dataloader, sft_steps: bool):
    """(update steps per epoch, scheduler steps): ``train_sft``'s (from the dataloader and the accumulation) with
    ``sft_steps``, else ``train_dpo``'s / ``train_rm``'s (from the samples and the global batch size)."""
    if sft_steps:
        per_epoch = max(1, len(train_dataloader) // strategy.accumulated_gradient)
        return per_epoch, len(train_dataloader) * args.train.max_epochs // strategy.accumulated_gradient
    per_epoch = len(train_dataset) // args.train.batch_size
    return per_epoch, math.ceil(args.train.max_epochs * per_epoch)


def fit(args, make_dataset, make_trainer, *, what: str, error: type, sft_steps: bool = False, load_model=None,
        actor_class=None, engine=lambda actor: actor.model):
    """Train as the module docstring says, and save the model to ``--ckpt.output_dir``.

    Args:
        make_dataset: ``make_dataset(args, tokenizer, strategy, evaluation)`` -> the training (``evaluation``
            False) or evaluation data set (asked for only with ``--eval.dataset``).
        make_trainer: ``make_trainer(args, model=, strategy=, optim=, train_dataloader=, eval_dataloader=,
            scheduler=, tokenizer=)`` -> an OpenRLHF trainer with ``fit(args, consumed_samples, steps_per_epoch)``.
        what: what a training item is called (``"pairs"``); error: the exception class raised (naming
            ``--train.batch_size``) when there are fewer items than one global batch.
        sft_steps: ``train_sft``'s step counts (see ``step_counts``).
        load_model: ``load_model(args, strategy)`` -> (model, tokenizer); default ``load_actor`` with ``actor_class``.
        engine: the DeepSpeed engine of the prepared model, where a checkpoint is loaded (default: ``Actor.model``).
    """
    from openrlhf.utils import get_tokenizer

    strategy = setup_strategy(args)
    tokenizer = get_tokenizer(args.model.model_name_or_path, None, "right", strategy,
                              use_fast=not args.data.disable_fast_tokenizer)
    train_dataset = make_dataset(args, tokenizer, strategy, evaluation=False)
    eval_dataset = make_dataset(args, tokenizer, strategy, evaluation=True) if args.eval.dataset else None
    if len(train_dataset) < args.train.batch_size:
        raise error(f"{len(train_dataset)} training {what} is fewer than one --train.batch_size "
                    f"({args.train.batch_size})")

    model, tokenizer = load_model(args, strategy) if load_model else load_actor(args, strategy, actor_class)
    train_dataloader, eval_dataloader = setup_dataloaders(strategy, args, train_dataset, eval_dataset)
    steps_per_epoch, max_steps = step_counts(args, strategy, train_dataset, train_dataloader, sft_steps)
    model, optim, scheduler, consumed_samples = prepare_and_resume(strategy, model, args, max_steps, engine)
    trainer = make_trainer(args, model=model, strategy=strategy, optim=optim, train_dataloader=train_dataloader,
                           eval_dataloader=eval_dataloader, scheduler=scheduler, tokenizer=tokenizer)
    trainer.fit(args, consumed_samples, steps_per_epoch)
    strategy.save_model(model, tokenizer, args.ckpt.output_dir)
