"""Train-step cost of TKPO against OpenRLHF's DPO (the paper's "56% of DPO's training time"), side by side.

    python benchmarks/bench_tkpo_step.py [--hidden 256 --layers 4 --vocab 8192 --seq 256 --rows 2 --steps 6]

Each variant runs in a fresh subprocess (1 rank, OpenRLHF's DeepSpeed strategy, ZeRO-2, bf16 on GPU, fp32 on CPU)
on the same tiny Llama, through the trainer's real ``fit()``, with ``--rows`` training examples per batch:

- ``dpo``:        OpenRLHF ``DPOTrainer`` on ``rows`` pairs (policy forward + backward over chosen and rejected,
  reference-model forward over both)
- ``sft``:        OpenRLHF ``SFTTrainer`` on ``rows`` responses (the CE alone: TKPO's floor)
- ``tkpo``:       ``TKPOTrainer`` on ``rows`` responses: policy forward + backward on (x, y), forward without
  gradient on (x', y), K = 20 negatives per token, negatives detached (the released code)
- ``tkpo_grad``:  the same with ``--tkpo.negatives_grad``

Every sequence has ``--seq`` tokens (``--prompt_len`` of them prompt). Step time: wall time between consecutive
batches handed to ``fit()`` after ``--warmup`` steps, fastest step compared (median printed too). Peak memory: on GPU
``torch.cuda.max_memory_allocated``; on CPU the RSS high-water mark above the RSS before the models were built.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import TimedBatches, run_variants  # noqa: E402  (the same timed dataloader and process loop)

VARIANTS = ("dpo", "sft", "tkpo", "tkpo_grad")


def run_variant(opts):
    """One variant in this process; prints a JSON line with its step times and peak memory."""
    import torch

    import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
    from openrlhf_sepo.cpu import patch_openrlhf_for_cpu, set_single_process_rendezvous

    set_single_process_rendezvous()
    patch_openrlhf_for_cpu()
    from openrlhf.models import Actor
    from openrlhf.trainer.dpo_trainer import DPOTrainer
    from openrlhf.trainer.sft_trainer import SFTTrainer
    from openrlhf.utils import get_strategy, get_tokenizer
    from openrlhf.utils.config import hierarchize

    from openrlhf_sepo.cli.train_tkpo import build_parser
    from openrlhf_sepo.tkpo import TKPOLoss
    from openrlhf_sepo.tkpo_trainer import TKPOActor, TKPOTrainer

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args = hierarchize(build_parser().parse_args([
        "--model.model_name_or_path", opts.model, "--data.dataset", "unused", "--data.output_key", "y",
        "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2", "--train.micro_batch_size", str(opts.rows),
        "--train.batch_size", str(opts.rows), "--train.max_epochs", "1"]))
    args.ds.packing_samples, args.ds.ring_attn_size = False, 1
    args.model.beta, args.model.label_smoothing, args.model.ipo_enable, args.model.nll_loss_coef = 0.1, 0.0, False, 0
    strategy = get_strategy(args)
    strategy.setup_distributed()
    if opts.dtype == "fp32":
        strategy.param_dtype = "fp32"  # DeepSpeed config with bf16 and fp16 both off; weights cast below

    def actor(ds_config, cls=Actor):
        model = cls(opts.model, attn_implementation="sdpa", param_dtype="bf16", ds_config=ds_config)
        return model.float() if opts.dtype == "fp32" else model

    cfg = dict(optim="adam", muon=vars(args.muon), adam=vars(args.adam), lr_scheduler="constant",
               lr_warmup_ratio=0.0, min_lr_ratio=0.1, max_norm=1.0, scheduler_steps=opts.steps)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, opts.vocab, (2, opts.rows, opts.seq), generator=g)
    att = torch.ones(opts.rows, opts.seq, dtype=torch.long)
    loss_mask = torch.zeros(opts.rows, 1, opts.seq)
    loss_mask[:, 0, opts.prompt_len - 1 : -1] = 1
    n = opts.warmup + opts.steps
    model = actor(strategy.get_ds_train_config(), TKPOActor if opts.variant.startswith("tkpo") else Actor)
    tokenizer = get_tokenizer(opts.model, model.model, "right", strategy)
    common = dict(strategy=strategy, train_dataloader=None, eval_dataloader=None, max_epochs=1, disable_ds_ckpt=True)
    if opts.variant == "dpo":
        ref = actor(strategy.get_ds_eval_config(offload=False))
        (model, optim, scheduler), ref = strategy.prepare((model, cfg), ref)
        batches = TimedBatches((ids[0], att, ids[1], att.clone(), [opts.prompt_len] * opts.rows), n)
        trainer = DPOTrainer(model=model, ref_model=ref, optim=optim, scheduler=scheduler, beta=0.1,
                             tokenizer=tokenizer, **{**common, "train_dataloader": batches})
    else:
        model, optim, scheduler = strategy.prepare((model, cfg))
        if opts.variant == "sft":
            batches = TimedBatches((ids[0].unsqueeze(1), att.unsqueeze(1), loss_mask), n)
            trainer = SFTTrainer(model=model, optim=optim, scheduler=scheduler, tokenizer=tokenizer,
                                 batch_size=opts.rows, **{**common, "train_dataloader": batches})
        else:  # (x', y): another prompt before the same response
            cf = ids[0].clone()
            cf[:, : opts.prompt_len] = ids[1][:, : opts.prompt_len]
            batches = TimedBatches((torch.stack([ids[0], cf], 1), torch.stack([att, att], 1), loss_mask), n)
            loss = TKPOLoss(num_negatives=20, tau=0.15, negatives_grad=opts.variant == "tkpo_grad")
            trainer = TKPOTrainer(model=model, optim=optim, scheduler=scheduler, tokenizer=tokenizer,
                                  batch_size=opts.rows, tkpo_loss=loss, lam=0.5, seed=0,
                                  **{**common, "train_dataloader": batches})
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(args, 0, len(batches))
    steps = [b - a for a, b in zip(batches.times[:-1], batches.times[1:])][opts.warmup :]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # ru_maxrss is KiB on Linux
    print("RESULT " + json.dumps({"variant": opts.variant, "step_s": min(steps),
                                  "median_s": statistics.median(steps), "peak_mib": peak, "steps": steps}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (prompt included)")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2, help="training examples per batch (DPO: pairs)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--model", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.dtype is None:
        import torch

        opts.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if opts.variant:
        return run_variant(opts)

    from openrlhf_sepo import tiny

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = os.path.join(tmp, "tokenizer")
        tiny.build_tokenizer(tokenizer_dir)
        model = tiny.build_model(os.path.join(tmp, "model"), tokenizer_dir, opts.hidden, opts.layers, opts.vocab)
        print(f"model: Llama hidden {opts.hidden}, {opts.layers} layers, vocab {opts.vocab}, {opts.dtype}; batch: "
              f"{opts.rows} examples x {opts.seq} tokens (prompt {opts.prompt_len}); {opts.steps} timed steps")
        passthrough = [f"--{n}={getattr(opts, n)}" for n in
                       ("hidden", "layers", "vocab", "seq", "prompt_len", "rows", "steps", "warmup", "dtype")]
        results = run_variants(os.path.abspath(__file__), model, passthrough, opts.variants.split(","))
    dpo = results.get("dpo")
    for variant in ("sft", "tkpo", "tkpo_grad"):
        if dpo and variant in results:
            r = results[variant]
            print(f"{variant}/dpo: fastest step time {r['step_s'] / dpo['step_s']:.2f}x   peak memory "
                  f"{r['peak_mib'] / dpo['peak_mib']:.2f}x")
    return results


if __name__ == "__main__":
    main()
