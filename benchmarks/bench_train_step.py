"""Train-step cost of SePO against OpenRLHF's DPO: step time and peak memory, one model, one batch, one run.

    python benchmarks/bench_train_step.py [--hidden 256 --layers 4 --vocab 8192 --seq 256 --pairs 2 --steps 6]

Each variant runs in a fresh subprocess (1 rank, OpenRLHF's DeepSpeed strategy, ZeRO-2, bf16 on GPU, fp32 on CPU
(see --dtype), through the CPU
runtime when there is no GPU) on the same tiny Llama and the same batch, through the trainer's real ``fit()``:

- ``dpo``:        OpenRLHF ``DPOTrainer`` (policy forward + backward, reference-model forward)
- ``sepo_full``:  ``SelectiveDPOTrainer --sepo.full_logits`` (policy forward + backward through OpenRLHF's
  ``Actor.forward``, full logits; k = 0.3 per response)
- ``sepo``:       ``SelectiveDPOTrainer --model.nll_loss_coef 0`` (the published objective): the LM head and
  log-softmax run at the selected positions only
- ``sepo_default``: ``SelectiveDPOTrainer`` in train_sepo's default configuration (its NLL term on, train_sepo's
  default coefficient): the LM head and log-softmax run at every chosen response token and the selected rejected ones

``dpo``, ``sepo_full`` and ``sepo`` pass ``--model.nll_loss_coef 0``, so they compare the preference losses alone
(DPOTrainer's own default has no NLL term).

Step time: wall time between consecutive batches handed to ``fit()`` after ``--warmup`` steps; the fastest
step is compared (the least disturbed by other processes on a shared machine), the median is printed too. Peak memory:
on GPU ``torch.cuda.max_memory_allocated``; on CPU the process's RSS high-water mark (``ru_maxrss``) minus the
RSS before the models were built, so the interpreter and imports are not counted. Each variant's process runs with
glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that every tensor above it is mapped on
allocation and unmapped on free and the high-water mark follows the live tensors, as ``max_memory_allocated`` does.
With glibc's default, dynamic threshold the heap keeps freed blocks, and the mark also counts what the allocator
happened to retain: identical DPO runs peaked anywhere between 441 and 487 MiB (2026-12-07: 444.7 and 470.6 MiB;
fixed threshold: 362.2 to 362.4 MiB in three runs).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("dpo", "sepo_full", "sepo", "sepo_default")


class TimedBatches:
    """A stand-in for the training dataloader: the same batch ``n`` times, recording when each is handed out."""

    sampler = None

    def __init__(self, batch, n):
        self.batch, self.n, self.times = batch, n, []

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            self.times.append(time.perf_counter())
            yield self.batch
        self.times.append(time.perf_counter())


def make_batch(tokenizer, pairs, seq, prompt_len, vocab, k):
    """Random ids (prompt + response + EOS), chosen/rejected response scores random, selected as the paper does."""
    import torch

    from openrlhf_sepo.datasets import KeyTokens
    from openrlhf_sepo.scoring import select_key_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (2, pairs, seq), generator=g)
    ids[..., -1] = tokenizer.eos_token_id
    masks = []
    for side, largest in ((0, True), (1, False)):
        selected = select_key_tokens(torch.randn(pairs, seq - prompt_len, generator=g), k, largest)
        mask = torch.zeros(pairs, seq - 1, dtype=torch.bool)
        mask[:, prompt_len - 1 :] = selected
        masks.append(mask)
    att = torch.ones(pairs, seq, dtype=torch.long)
    return ids[0], att, ids[1], att.clone(), KeyTokens([prompt_len] * pairs, masks[0], masks[1])


def run_variant(opts):
    """One variant in this process; prints a JSON line with its step times and peak memory."""
    import torch

    import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
    from openrlhf_sepo.cpu import patch_openrlhf_for_cpu, set_single_process_rendezvous

    set_single_process_rendezvous()
    patch_openrlhf_for_cpu()
    from openrlhf.models import Actor
    from openrlhf.trainer.dpo_trainer import DPOTrainer
    from openrlhf.utils import get_strategy, get_tokenizer
    from openrlhf.utils.config import hierarchize

    from openrlhf_sepo.cli.train_sepo import build_parser
    from openrlhf_sepo.trainer import SelectiveDPOTrainer

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flat = build_parser().parse_args([
        "--model.model_name_or_path", opts.model, "--data.dataset", "unused",
        "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2",
        "--train.micro_batch_size", str(opts.pairs), "--train.batch_size", str(opts.pairs),
        "--train.max_epochs", "1", "--sepo.k_chosen", str(opts.k), "--sepo.k_rejected", str(opts.k),
        # sepo_default keeps train_sepo's default NLL term; the others compare the preference losses alone.
        *([] if opts.variant == "sepo_default" else ["--model.nll_loss_coef", "0"]),
    ])
    args = hierarchize(flat)
    args.model.beta, args.model.label_smoothing, args.model.ipo_enable = 0.1, 0.0, False  # DPOTrainer's flags
    strategy = get_strategy(args)
    strategy.setup_distributed()
    cuda = torch.cuda.is_available()
    if opts.dtype == "fp32":
        strategy.param_dtype = "fp32"  # DeepSpeed config with bf16 and fp16 both off; weights cast below

    def actor(ds_config):
        model = Actor(opts.model, attn_implementation="sdpa", param_dtype="bf16", ds_config=ds_config)
        return model.float() if opts.dtype == "fp32" else model

    model = actor(strategy.get_ds_train_config())
    tokenizer = get_tokenizer(opts.model, model.model, "right", strategy)
    cfg = dict(optim="adam", muon=vars(args.muon), adam=vars(args.adam), lr_scheduler="constant",
               lr_warmup_ratio=0.0, min_lr_ratio=0.1, max_norm=1.0, scheduler_steps=opts.steps)
    batch = make_batch(tokenizer, opts.pairs, opts.seq, opts.prompt_len, opts.vocab, opts.k)
    batches = TimedBatches(batch, opts.warmup + opts.steps)
    common = dict(strategy=strategy, tokenizer=tokenizer, train_dataloader=batches, eval_dataloader=None,
                  max_epochs=1, disable_ds_ckpt=True)
    if opts.variant == "dpo":
        ref = actor(strategy.get_ds_eval_config(offload=False))
        (model, optim, scheduler), ref = strategy.prepare((model, cfg), ref)
        trainer = DPOTrainer(model=model, ref_model=ref, optim=optim, scheduler=scheduler, beta=0.1, **common)
        batch = batch[:4] + (batch[4].prompt_id_lens,)  # OpenRLHF's 5-tuple: plain prompt lengths
        batches.batch = batch
    else:
        model, optim, scheduler = strategy.prepare((model, cfg))
        trainer = SelectiveDPOTrainer(model=model, optim=optim, scheduler=scheduler, beta=1.0, gamma=0.0,
                                      full_logits=opts.variant == "sepo_full", **common)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(args, 0, len(batches))
    steps = [b - a for a, b in zip(batches.times[:-1], batches.times[1:])][opts.warmup :]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # ru_maxrss is KiB on Linux
    print("RESULT " + json.dumps({"variant": opts.variant, "step_s": min(steps),
                                  "median_s": statistics.median(steps), "peak_mib": peak,
                                  "steps": steps}))


def run_variants(script, model, passthrough, variants):
    """{variant: result}: ``script --variant V --model MODEL PASSTHROUGH...`` in a fresh process per variant (its
    ``RESULT`` JSON line), each printed as it finishes. Shared with bench_tkpo_step.py."""
    results = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # the CPU's peak follows live tensors (module docstring)
    for variant in variants:
        proc = subprocess.run([sys.executable, script, "--variant", variant, "--model", model, *passthrough],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"variant {variant} failed:\n{proc.stdout[-4000:]}")
        results[variant] = r = json.loads(lines[-1][len("RESULT ") :])
        print(f"{variant:>12}: step {r['step_s'] * 1000:8.1f} ms (median {r['median_s'] * 1000:.1f})   "
              f"peak {r['peak_mib']:8.1f} MiB")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256, help="tokens per response sequence (prompt included)")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs in the batch")
    parser.add_argument("--k", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="default: bf16 on GPU; fp32 on CPU, whose bf16 backward matmuls run ~7x slower than the "
                        "forward and would hide the reference forward this benchmark is about")
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
        print(f"model: Llama hidden {opts.hidden}, {opts.layers} layers, vocab {opts.vocab}, {opts.dtype}; batch: {opts.pairs} pairs "
              f"x {opts.seq} tokens (prompt {opts.prompt_len}), k = {opts.k}; {opts.steps} timed steps")
        passthrough = [f"--{n}={getattr(opts, n)}" for n in
                       ("hidden", "layers", "vocab", "seq", "prompt_len", "pairs", "k", "steps", "warmup", "dtype")]
        results = run_variants(os.path.abspath(__file__), model, passthrough, opts.variants.split(","))
    dpo = results.get("dpo")
    for variant in VARIANTS[1:]:
        if dpo and variant in results:
            r = results[variant]
            print(f"{variant}/dpo: fastest step time {r['step_s'] / dpo['step_s']:.2f}x   peak memory "
                  f"{r['peak_mib'] / dpo['peak_mib']:.2f}x")
    return results


if __name__ == "__main__":
    main()
