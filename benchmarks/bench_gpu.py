"""GPU benchmark: train-step time and peak memory of DPO, SimPO, SePO (default and published), TKPO and SFT, and
token-scoring throughput against the bare forward, on a randomly initialised ~1B Llama, in one process.

    python benchmarks/bench_gpu.py [--seq 1024 --pairs 4 --steps 10 --json bench_gpu.json --markdown bench_gpu.md]
    python benchmarks/bench_gpu.py --device cpu --tiny          # smoke test: tiny sizes, a few seconds on a CPU

Model (default): TinyLlama-1.1B's shape (the paper's oracle size): hidden 2048, 22 layers, 32 heads (4 key/value
heads), intermediate 5632, vocab 32000, untied embeddings: 1.10B parameters, bf16 weights, sdpa attention, random
init. Batch: ``--pairs`` preference pairs of ``--seq`` tokens each (``--prompt_len`` of them prompt, no padding);
TKPO and SFT get ``--pairs`` rows of the same length (an example per pair, as bench_tkpo_step.py compares them).

What runs is the package's trainer code, driven the way OpenRLHF's ``fit`` loops drive it: ``SelectiveDPOTrainer``
(its ``concatenated_forward``, selected-positions forward, ``SePOLoss``), ``TKPOActor`` / ``TKPOTrainer`` (``TKPOLoss``),
OpenRLHF's ``DPOTrainer`` and ``SFTTrainer``, each step the loop body of their ``fit`` (``preference_step``,
``sft_step``) then backward and an optimizer step. Where OpenRLHF is not installed (a lent GPU machine has torch
and transformers only), OpenRLHF and DeepSpeed must be carried there as wheels built on a registry machine (see
docs/cost.md); without OpenRLHF the benchmark stops and says so. Not the production path: no DeepSpeed engine (``loss.backward()`` and
``MasterWeightAdam``, fp32 master weights and Adam moments as DeepSpeed's bf16 optimizer keeps them, stand in for
the engine's backward and ZeRO-2 step), no data loading, one rank.

Step time: wall time (``--clock cpu`` on a CPU: the process's CPU time on one thread, which a shared machine's other
jobs do not inflate) of forward + backward + optimizer step, ``--warmup`` untimed steps then ``--steps`` timed,
median and min (CUDA synchronised). Peak memory: ``torch.cuda.max_memory_allocated`` over the variant's steps
(weights, reference model, optimizer state, activations). On CPU, where there is no such counter, the bytes of
the resident tensors (weights, optimizer state) plus the peak of the tensor bytes allocated during one extra,
untimed step (a dispatch-mode counter): an estimate. Scoring: ``scoring.token_scores`` (oracle and reference
forwards, fp32 label log-probs, scores copied to the host) against ``oracle(ids)`` + ``ref(ids)`` alone, on the
same batch of 2 x ``--pairs`` sequences, in response tokens per second (the policy and its reference stand in
for the oracle and its reference; tokenization, the score_tokens CLI's share, is not timed).
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import weakref
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.utils._python_dispatch
import torch.utils._pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openrlhf_sepo  # noqa: E402,F401  (flash-attn placeholder before OpenRLHF, where OpenRLHF is installed)
from openrlhf_sepo.scoring import select_key_tokens, token_scores  # noqa: E402
from openrlhf_sepo.tkpo import TKPOLoss  # noqa: E402

VARIANTS = ("dpo", "simpo", "sepo_default", "sepo_published", "tkpo", "sft")
SIZES = {
    "1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=8192),  # bench_train_step's
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=512),
}
TINY_RUN = dict(seq=64, prompt_len=16, pairs=2, warmup=1, steps=2, repeats=2)
# The entrypoints' defaults (tests/test_bench_gpu.py checks them against train_sepo's and train_tkpo's parsers).
SEPO_NLL_COEF, SEPO_K, SEPO_BETA = 1.0, 0.3, 1.0
TKPO_NEGATIVES, TKPO_TAU, TKPO_LAM = 20, 0.15, 0.5
DPO_BETA, MAX_NORM, LR = 0.1, 1.0, 5e-7
DESCRIPTION = {
    "dpo": "OpenRLHF DPOTrainer: policy fwd+bwd on chosen and rejected, reference forward",
    "simpo": "SelectiveDPOTrainer, k = 1 (every response token), NLL off",
    "sepo_default": f"SelectiveDPOTrainer as train_sepo runs it: k = {SEPO_K}, NLL term on (coef {SEPO_NLL_COEF:g})",
    "sepo_published": f"SelectiveDPOTrainer, k = {SEPO_K}, NLL off (the published objective)",
    "tkpo": f"TKPOTrainer: CE + {TKPO_LAM} TKPO, K = {TKPO_NEGATIVES}, no-grad forward on (x', y)",
    "sft": "OpenRLHF SFTTrainer: CE on one response per pair",
}


class KeyTokens(NamedTuple):
    """``openrlhf_sepo.datasets.KeyTokens`` (that module imports OpenRLHF; the test checks the fields match)."""

    prompt_id_lens: list
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_nll_skip: torch.Tensor = None


class MasterWeightAdam:
    """AdamW on fp32 master copies of bf16 weights (fp32 moments), the copies written back after each step, the
    gradient norm clipped on the fp32 gradients: what DeepSpeed's bf16 optimizer keeps and does on one rank.
    fp32 weights are stepped in place."""

    def __init__(self, params, lr):
        self.params = [p for p in params if p.requires_grad]
        self.fp32 = all(p.dtype == torch.float32 for p in self.params)
        self.master = self.params if self.fp32 else [p.detach().float() for p in self.params]
        fused = self.params[0].device.type == "cuda"
        self.optim = torch.optim.AdamW(self.master, lr=lr, fused=fused, foreach=None if fused else True)

    def step(self, max_norm):
        if not self.fp32:
            for m, p in zip(self.master, self.params):
                m.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(self.master, max_norm)
        self.optim.step()
        for m, p in zip(self.master, self.params):
            m.grad = None
            if not self.fp32:
                p.data.copy_(m)
        for p in self.params:
            p.grad = None

    def state_bytes(self):
        state = [t for s in self.optim.state.values() for t in s.values() if torch.is_tensor(t)]
        return tensor_bytes(state) + (0 if self.fp32 else tensor_bytes(self.master))


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """CPU peak-memory estimate: the peak of the bytes of tensors created inside the mode and still alive."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if id(storage) not in self.live:
                    self.live[id(storage)] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, id(storage))
        return out


# --- OpenRLHF ------------------------------------------------------------------------------------------------------

def openrlhf_classes():
    """A context manager yielding the trainer classes, OpenRLHF's and the package's as installed. OpenRLHF is needed:
    the package's trainers subclass its trainers, and this benchmark times them, not a copy of them."""
    import contextlib
    import importlib.util

    if importlib.util.find_spec("openrlhf") is None or importlib.util.find_spec("deepspeed") is None:
        raise SystemExit("bench_gpu.py needs OpenRLHF 0.11.2 and DeepSpeed importable (the package's trainers subclass "
                         "OpenRLHF's): on a machine without a registry, carry their wheels (docs/cost.md)")

    @contextlib.contextmanager
    def real():
        import importlib.metadata

        from openrlhf.models import Actor
        from openrlhf.trainer.dpo_trainer import DPOTrainer
        from openrlhf.trainer.sft_trainer import SFTTrainer

        from openrlhf_sepo.tkpo_trainer import TKPOActor, TKPOTrainer
        from openrlhf_sepo.trainer import SelectiveDPOTrainer

        yield SimpleNamespace(SelectiveDPOTrainer=SelectiveDPOTrainer, TKPOActor=TKPOActor, TKPOTrainer=TKPOTrainer,
                              Actor=Actor, DPOTrainer=DPOTrainer, SFTTrainer=SFTTrainer,
                              openrlhf=f"OpenRLHF {importlib.metadata.version('openrlhf')} (installed)")

    return real()


class BenchStrategy:
    """What the trainers read from OpenRLHF's strategy: ``args`` (the flags), one rank, no ring attention."""

    ring_attn_group = None

    def __init__(self, nll_loss_coef=0.0):
        logger = SimpleNamespace(wandb=SimpleNamespace(key=None), tensorboard_dir=None)
        model = SimpleNamespace(nll_loss_coef=nll_loss_coef, aux_loss_coef=0.0, label_smoothing=0.0,
                                ipo_enable=False)
        self.args = SimpleNamespace(model=model, ds=SimpleNamespace(packing_samples=False), logger=logger)

    def get_rank(self):
        return 0

    def is_rank_0(self):
        return True


def wrap(actor_class, hf_model):
    """``actor_class`` (OpenRLHF's ``Actor`` or a subclass) around a built HF model, as ``Actor(model)`` builds it."""
    actor = actor_class(hf_model)
    actor.packing_samples = False  # Actor(model) sets it only when it loads a checkpoint itself
    return actor


# --- the fit loops' bodies -----------------------------------------------------------------------------------------

def preference_step(trainer, batch):
    """``DPOTrainer.fit``'s loop body up to the loss (OpenRLHF 0.11.2), which SelectiveDPOTrainer keeps: policy
    ``concatenated_forward``, the reference slot's under no_grad, ``loss_fn``, + aux and NLL terms."""
    chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens = batch
    chosen_logps, rejected_logps, aux_loss, nll_loss = trainer.concatenated_forward(
        trainer.model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens)
    with torch.no_grad():
        ref_chosen, ref_rejected, _, _ = trainer.concatenated_forward(
            trainer.ref_model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens)
    preference_loss, _, _ = trainer.loss_fn(chosen_logps, rejected_logps, ref_chosen, ref_rejected)
    aux_loss = aux_loss if trainer.aux_loss else 0
    nll_loss = nll_loss if trainer.nll_loss else 0
    return preference_loss + aux_loss * trainer.args.model.aux_loss_coef + nll_loss * trainer.args.model.nll_loss_coef


def sft_step(trainer, batch):
    """``SFTTrainer.fit``'s loop body up to the loss (OpenRLHF 0.11.2; one micro-batch, one rank), which
    TKPOTrainer keeps: the model's forward with log-probs, then ``loss_fn`` on the shifted loss mask."""
    inputs, attention_masks, loss_masks = batch
    per_token_log_probs, _ = trainer.model(inputs.squeeze(1), attention_mask=attention_masks.squeeze(1),
                                           return_output=True, return_logprobs=True,
                                           ring_attn_group=trainer.strategy.ring_attn_group)
    return trainer.loss_fn(per_token_log_probs, loss_masks.squeeze(1)[:, :-1])


# --- batches, models -----------------------------------------------------------------------------------------------

def make_batches(opts, vocab, device):
    """{"pairs": (chosen, c_mask, rejected, r_mask), "masks": {k: KeyTokens}, "tkpo": ..., "sft": ...} on device:
    random ids, selection of random scores by the paper's rule (as bench_train_step.make_batch does)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (3, opts.pairs, opts.seq), generator=g)
    att = torch.ones(opts.pairs, opts.seq, dtype=torch.long)
    response = opts.seq - opts.prompt_len
    masks = {}
    for k in (SEPO_K, 1.0):
        sides = []
        for largest in (True, False):
            mask = torch.zeros(opts.pairs, opts.seq - 1, dtype=torch.bool)
            mask[:, opts.prompt_len - 1 :] = select_key_tokens(torch.randn(opts.pairs, response, generator=g), k, largest)
            sides.append(mask.to(device))
        masks[k] = KeyTokens([opts.prompt_len] * opts.pairs, *sides)
    loss_mask = torch.zeros(opts.pairs, 1, opts.seq)
    loss_mask[:, 0, opts.prompt_len - 1 : -1] = 1
    counterfactual = ids[0].clone()
    counterfactual[:, : opts.prompt_len] = ids[2][:, : opts.prompt_len]  # another prompt, the same response
    to = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    return {"pairs": to(ids[0], att, ids[1], att.clone()), "masks": masks,
            "tkpo": to(torch.stack([ids[0], counterfactual], 1), torch.stack([att, att], 1), loss_mask),
            "sft": to(ids[0].unsqueeze(1), att.unsqueeze(1), loss_mask)}


def build_policy(size, opts, device, dtype):
    """A randomly initialised Llama (seed 0) of ``size`` on ``device``, sdpa attention, ``use_cache`` off."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv_heads"], max_position_embeddings=max(2048, opts.seq),
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
    model.config.use_cache = False
    return model


# --- the variants --------------------------------------------------------------------------------------------------

def make_trainer(variant, cls, policy, ref, batches):
    """(trainer, step function, batch) of one variant, built as the entrypoints build it."""
    tokenizer = SimpleNamespace(pad_token_id=0)
    common = dict(optim=None, train_dataloader=None, eval_dataloader=None, scheduler=None, max_norm=MAX_NORM,
                  max_epochs=1)
    if variant == "dpo":
        trainer = cls.DPOTrainer(wrap(cls.Actor, policy), wrap(cls.Actor, ref), BenchStrategy(), tokenizer,
                                 beta=DPO_BETA, **common)
        return trainer, preference_step, (*batches["pairs"], list(batches["masks"][SEPO_K].prompt_id_lens))
    if variant in ("simpo", "sepo_default", "sepo_published"):
        nll = SEPO_NLL_COEF if variant == "sepo_default" else 0.0
        trainer = cls.SelectiveDPOTrainer(wrap(cls.Actor, policy), BenchStrategy(nll), tokenizer, beta=SEPO_BETA,
                                          gamma=0.0, **common)
        return trainer, preference_step, (*batches["pairs"], batches["masks"][1.0 if variant == "simpo" else SEPO_K])
    if variant == "tkpo":
        loss = TKPOLoss(num_negatives=TKPO_NEGATIVES, tau=TKPO_TAU)
        trainer = cls.TKPOTrainer(wrap(cls.TKPOActor, policy), BenchStrategy(), tokenizer=tokenizer,
                                  batch_size=len(batches["tkpo"][0]), tkpo_loss=loss, lam=TKPO_LAM, seed=0, **common)
        return trainer, sft_step, batches["tkpo"]
    trainer = cls.SFTTrainer(wrap(cls.Actor, policy), BenchStrategy(), tokenizer=tokenizer,
                             batch_size=len(batches["sft"][0]), **common)
    return trainer, sft_step, batches["sft"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (--clock)


def run_variant(variant, cls, policy, ref, batches, opts, device):
    """{"median_s", "min_s", "steps", "peak_mib", ...} of one variant: its trainer, a fresh optimizer."""
    trainer, step_fn, batch = make_trainer(variant, cls, policy, ref if variant == "dpo" else None, batches)
    optimizer = MasterWeightAdam(policy.parameters(), LR)
    trainer.model.train()
    if variant == "dpo":
        trainer.ref_model.eval()

    def step():
        loss = step_fn(trainer, batch)
        loss.backward()
        optimizer.step(MAX_NORM)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(opts.warmup + opts.steps):
        sync(device)
        start = CLOCK[opts.clock]()
        step()
        sync(device)
        times.append(CLOCK[opts.clock]() - start)
    times = times[opts.warmup :]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        resident = tensor_bytes(policy.parameters()) + optimizer.state_bytes()
        resident += tensor_bytes(ref.parameters()) if variant == "dpo" else 0
        with LiveTensorBytes() as counter:
            step()
        peak = resident + counter.peak
    result = {"median_s": statistics.median(times), "min_s": min(times), "steps": times, "peak_mib": peak / 2**20,
              "what": DESCRIPTION[variant]}
    if hasattr(trainer, "selected_positions_only"):
        result["selected_positions_only"] = trainer.selected_positions_only
    return result


def run_scoring(oracle, ref, batches, opts, device):
    """Seconds (median, min over ``--repeats``) and response tokens/s of token_scores and of the bare forwards."""
    chosen, c_mask, rejected, r_mask = batches["pairs"]
    ids, att = torch.cat([chosen, rejected]), torch.cat([c_mask, r_mask])
    n = ids.shape[0]
    keep = opts.seq - opts.prompt_len + 1
    methods = {
        "token_scores": lambda: token_scores(oracle, ref, ids, att, [opts.prompt_len] * n, [opts.seq] * n),
        "bare_forward": lambda: [m(input_ids=ids, attention_mask=att, use_cache=False) for m in (oracle, ref)],
        "bare_forward_response_logits": lambda: [m(input_ids=ids, attention_mask=att, use_cache=False,
                                                   logits_to_keep=keep) for m in (oracle, ref)],
    }
    tokens = n * (opts.seq - opts.prompt_len)
    out = {"response_tokens": tokens}
    with torch.inference_mode():
        for name, fn in methods.items():
            fn()  # warm-up
            times = []
            for _ in range(opts.repeats):
                sync(device)
                start = CLOCK[opts.clock]()
                fn()
                sync(device)
                times.append(CLOCK[opts.clock]() - start)
            out[name] = {"median_s": statistics.median(times), "min_s": min(times),
                         "tokens_per_s": tokens / statistics.median(times)}
    return out


# --- report --------------------------------------------------------------------------------------------------------

def markdown(results):
    """The results as markdown: a header naming the machine, the step table, the scoring table."""
    v, s, m = results["variants"], results["scoring"], results["model"]
    dpo = v.get("dpo")
    load = (f", {results['cpu_threads']} thread(s), {results['clock']} clock, load average {results['load_average_before'][0]:.1f} before, "
            f"{results['load_average_after'][0]:.1f} after" if "cpu_threads" in results else "")
    lines = [f"**{results['machine']}** ({results['device']}{load}), torch {results['torch']}, transformers "
             f"{results['transformers']}, OpenRLHF: {results['openrlhf']}", "",
             f"Model: Llama, hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads ({m['kv_heads']} KV), "
             f"intermediate {m['intermediate']}, vocab {m['vocab']}: {m['parameters'] / 1e6:,.1f}M parameters, "
             f"{results['dtype']}, sdpa, random init. Batch: {results['pairs']} pairs x {results['seq']} tokens "
             f"(prompt {results['prompt_len']}); {results['warmup']} warm-up + {results['timed_steps']} timed steps.",
             "", "| variant | one step | median ms | min ms | median / DPO | min / DPO | peak MiB | peak / DPO |",
             "|---|---|---|---|---|---|---|---|"]
    def ratio(r, key):
        return f"{r[key] / dpo[key]:.2f}" if dpo else "-"

    for name, r in v.items():
        lines.append(f"| {name} | {r['what']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | "
                     f"{ratio(r, 'median_s')} | {ratio(r, 'min_s')} | {r['peak_mib']:.0f} | {ratio(r, 'peak_mib')} |")
    lines += ["", f"Scoring, {s['response_tokens']} response tokens (oracle + reference):", "",
              "| method | median s | response tokens/s | time / bare forward |", "|---|---|---|---|"]
    what = {"token_scores": "scoring.token_scores (fp32 label log-probs, scores to host)",
            "bare_forward": "bare forward, full logits (floor)",
            "bare_forward_response_logits": "bare forward, response logits only"}
    for name, label in what.items():
        r = s[name]
        lines.append(f"| {label} | {r['median_s']:.4f} | {r['tokens_per_s']:.0f} | "
                     f"{r['median_s'] / s['bare_forward']['median_s']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="1b", help="model shape (small: bench_train_step's)")
    p.add_argument("--tiny", action="store_true", help=f"--size tiny and a tiny run ({TINY_RUN}): a smoke test")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (prompt included)")
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (TKPO, SFT: rows)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats of each scoring method")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                   help="cpu (CPU only): this process's CPU time on 1 thread, which other jobs on a shared machine "
                   "do not inflate as they inflate wall time")
    p.add_argument("--json", default="bench_gpu.json", help="where to write the results ('' for nowhere)")
    p.add_argument("--markdown", default="", help="also write the table here")
    opts = p.parse_args(argv)
    if opts.tiny:
        opts.size = "tiny"
        for name, value in TINY_RUN.items():
            if p.get_default(name) == getattr(opts, name):
                setattr(opts, name, value)
    opts.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts.dtype = opts.dtype or ("bf16" if opts.device.type == "cuda" else "fp32")
    if opts.clock == "cpu":
        if opts.device.type != "cpu":
            p.error("--clock cpu times CPU runs only")
        torch.set_num_threads(1)
    unknown = set(opts.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return opts


def main(argv=None):
    """Run the benchmark, print the markdown table, write the JSON; returns the results dict."""
    import transformers

    opts = parse_args(argv)
    device, dtype = opts.device, {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.dtype]
    size = SIZES[opts.size]
    policy = build_policy(size, opts, device, dtype)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    batches = make_batches(opts, size["vocab"], device)
    results = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
               "dtype": opts.dtype, "model": {**size, "parameters": sum(p.numel() for p in policy.parameters())},
               "seq": opts.seq, "prompt_len": opts.prompt_len, "pairs": opts.pairs, "warmup": opts.warmup,
               "timed_steps": opts.steps, "variants": {}}
    if device.type == "cpu":  # a shared CPU's load skews the timings: recorded with them
        results["cpu_threads"], results["load_average_before"] = torch.get_num_threads(), os.getloadavg()
    results["clock"] = opts.clock
    policy.eval()
    results["scoring"] = run_scoring(policy, ref, batches, opts, device)
    with openrlhf_classes() as cls:
        results["openrlhf"] = cls.openrlhf
        variants = opts.variants.split(",")
        for variant in sorted(variants, key=lambda v: v != "dpo"):  # DPO first: then its reference model is freed
            if variant != "dpo" and ref is not None:
                ref = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results["variants"][variant] = run_variant(variant, cls, policy, ref, batches, opts, device)
    if device.type == "cpu":
        results["load_average_after"] = os.getloadavg()
    table = markdown(results)
    print(table)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(table)
    return results


def finite_numbers(results):
    """True iff every step time, peak memory and scoring rate in ``results`` is finite and positive."""
    values = [r[k] for r in results["variants"].values() for k in ("median_s", "min_s", "peak_mib")]
    values += [results["scoring"][m][k] for m in ("token_scores", "bare_forward", "bare_forward_response_logits")
               for k in ("median_s", "tokens_per_s")]
    return all(math.isfinite(x) and x > 0 for x in values)


if __name__ == "__main__":
    main()
