"""Whole-pipeline cost per method (SFT, DPO, SimPO, SePO with its oracle, the token reward model, TKPO) from per-token
costs, at the paper's setting by default (7B policy, 1.1B oracle, 60k pairs). Every stage is a number of tokens
times a per-token cost; the assumptions are flags and are printed with the tables (docs/cost.md).

    python benchmarks/cost_table.py                                  # the FLOP model alone (2N forward, 6N train)
    python benchmarks/cost_table.py --measure --per_token_out per_token_cpu.json   # + per-token costs measured here
    python benchmarks/cost_table.py --per_token per_token_cpu.json --bench bench_gpu.json   # + measured step ratios

Per-token costs. The FLOP model: a forward costs 2N per token, a training step (forward + backward) 6N, with N the
parameters a token passes through (all but the input embedding). ``--measure`` times, on this machine, a bare
forward and a training step (forward, cross-entropy, backward, AdamW step) per token on randomly initialised Llamas
of several sizes, fits ``seconds/token = a * N + b`` to each, and uses ``a * N`` (the fixed cost b is dropped for
models of 10^9 parameters): only the ratio a_train / a_forward matters for the table (the FLOP model says 3).

Step ratios. With ``--bench`` (``bench_gpu.py``'s JSON) a method's policy stage is DPO's policy stage times its
measured step time over DPO's (``--statistic``: min or median step), which the composition from per-token costs
cannot see (the NLL term's full logits, the selected-positions LM head, TKPO's negatives); the scoring stage is
multiplied by token_scores' time over the bare forward's. The ratios are measured at the bench's model size and
applied at the policy's (an assumption, stated with the table).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MEASURE_SIZES = ((128, 2), (256, 4), (384, 6), (512, 8))  # (hidden, layers) for --measure
TINY_MEASURE = dict(sizes=((32, 1), (64, 2)), vocab=512, seq=32, batch=2, repeats=1)


# --- per-token costs -----------------------------------------------------------------------------------------------

def flop_params(model):
    """Parameters a token passes through: all but the input embedding (a lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def time_per_token(fn, tokens, repeats):
    """Fastest of ``repeats`` runs (after one warm-up), in this process's CPU seconds per token."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times) / tokens


def measure_point(hidden, layers, vocab, seq, batch, repeats):
    """(N, forward s/token, train-step s/token) of one randomly initialised fp32 Llama on this CPU."""
    import torch

    from bench_gpu import build_policy

    heads = max(1, hidden // 64)
    size = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 2),
                intermediate=16 * round(2.75 * hidden / 16), vocab=vocab)
    model = build_policy(size, SimpleNamespace(seq=seq), torch.device("cpu"), torch.float32)
    ids = torch.randint(10, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def forward():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def train():
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    tokens = batch * seq
    return flop_params(model), time_per_token(forward, tokens, repeats), time_per_token(train, tokens, repeats)


def linear_fit(xs, ys):
    """(slope, intercept) of least squares y = a x + b."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return a, my - a * mx


def measure_per_token(sizes=MEASURE_SIZES, vocab=8192, seq=256, batch=4, repeats=3):
    """Per-token costs measured on this CPU (fp32, one thread, process CPU time: other jobs on a shared machine do
    not inflate it as they inflate wall time) at ``sizes``, and their linear fits in N."""
    import torch

    threads, load_before = torch.get_num_threads(), os.getloadavg()
    torch.set_num_threads(1)
    try:
        points = [measure_point(h, layer, vocab, seq, batch, repeats) for h, layer in sizes]
    finally:
        torch.set_num_threads(threads)
    fwd, fwd_b = linear_fit([p[0] for p in points], [p[1] for p in points])
    train, train_b = linear_fit([p[0] for p in points], [p[2] for p in points])
    return {"machine": "CPU", "clock": "process CPU time", "torch_threads": 1,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "dtype": "fp32", "vocab": vocab, "seq": seq,
            "batch": batch, "points": [{"hidden": h, "layers": layer, "params": n, "forward_s_per_token": f,
                                        "train_s_per_token": t} for (h, layer), (n, f, t) in zip(sizes, points)],
            "forward_s_per_token_per_param": fwd, "forward_intercept_s": fwd_b,
            "train_s_per_token_per_param": train, "train_intercept_s": train_b, "train_over_forward": train / fwd}


# --- the pipeline --------------------------------------------------------------------------------------------------

def unit_costs(per_token=None):
    """(forward(N), train(N)) per-token cost functions: the FLOP model, or the measured slopes."""
    if per_token is None:
        return (lambda n: 2 * n), (lambda n: 6 * n)
    a_f, a_t = per_token["forward_s_per_token_per_param"], per_token["train_s_per_token_per_param"]
    return (lambda n: a_f * n), (lambda n: a_t * n)


def bench_ratios(bench, statistic="min_s"):
    """{variant: its step time / DPO's} and {"scoring": token_scores / bare forward} from bench_gpu JSON."""
    variants = bench["variants"]
    ratios = {v: r[statistic] / variants["dpo"][statistic] for v, r in variants.items()} if "dpo" in variants else {}
    scoring = bench["scoring"]
    ratios["scoring"] = scoring["token_scores"]["median_s"] / scoring["bare_forward"]["median_s"]
    return ratios


def oracle_sizes(s):
    return [(f"1/4 of the policy ({s.policy / 4 / 1e9:.2f}B)", s.policy / 4),
            (f"1/16 of the policy ({s.policy / 16 / 1e9:.2f}B)", s.policy / 16),
            (f"the paper's {s.oracle / 1e9:.2f}B", s.oracle)]


def pipeline(s, fwd, train, ratios=None):
    """[(method, {stage: cost})]: every stage's tokens x per-token cost (formulas in docs/cost.md)."""
    ratios = ratios or {}
    pairs, seq, epochs = s.pairs, s.tokens_per_seq, s.epochs
    dpo_policy = pairs * epochs * 2 * seq * (train(s.policy) + fwd(s.policy))

    def policy(variant, composed):
        return dpo_policy * ratios[variant] if variant in ratios else composed

    reference_free = pairs * epochs * 2 * seq * train(s.policy)
    sft = dpo_policy / epochs * s.sft_epochs * ratios["sft"] if "sft" in ratios else None
    rows = [("SFT of the policy (shared by every method)",
             {"policy": sft if sft is not None else pairs * seq * s.sft_epochs * train(s.policy)}),
            ("DPO", {"policy": dpo_policy}),
            ("SimPO", {"policy": policy("simpo", reference_free)})]
    for label, n in oracle_sizes(s):
        small_sft = pairs * seq * s.sft_epochs * train(n) if s.oracle_sft else 0.0
        rows.append((f"SePO, oracle {label}", {
            "small SFT": small_sft,
            "oracle / RM": s.share * pairs * s.oracle_epochs * 2 * seq * (train(n) + fwd(n)),
            "scoring": pairs * 2 * seq * 2 * fwd(n) * ratios.get("scoring", 1.0),
            "policy": policy("sepo_default", reference_free)}))
        if "sepo_published" in ratios and n == s.oracle:
            rows.append((f"SePO published objective (NLL off), oracle {label}",
                         {**rows[-1][1], "policy": policy("sepo_published", reference_free)}))
    for label, n in oracle_sizes(s)[:2]:
        rows.append((f"token RM + SePO, RM {label}", {
            "small SFT": pairs * seq * s.sft_epochs * train(n) if s.oracle_sft else 0.0,
            "oracle / RM": s.share * pairs * s.oracle_epochs * 2 * seq * train(n),
            "scoring": pairs * 2 * seq * fwd(n),
            "policy": policy("sepo_default", reference_free)}))
    rows.append(("TKPO (one SFT row per pair)", {"policy": policy("tkpo", pairs * epochs * seq * (train(s.policy)
                                                                                                 + fwd(s.policy)))}))
    return rows


def break_even_share(s, fwd, train, ratios=None):
    """{method: the oracle's (or RM's) share of the pairs at which its pipeline costs what DPO's does}: every stage
    but the oracle's is fixed and the oracle's is linear in the share (>= 1: cheaper at any share; <= 0: dearer)."""
    rows = pipeline(s, fwd, train, ratios)
    dpo = dict(rows)["DPO"]["policy"]
    out = {}
    for label, cost in rows:
        if "oracle / RM" in cost:
            fixed = sum(cost.values()) - cost["oracle / RM"]
            out[label] = (dpo - fixed) / (cost["oracle / RM"] / s.share)
    return out


# --- report --------------------------------------------------------------------------------------------------------

STAGES = ("small SFT", "oracle / RM", "scoring", "policy")


def table(s, fwd, train, ratios=None, flops=False):
    """Markdown: every stage in % of DPO's total; with ``flops`` also the totals in EFLOP (10^18)."""
    rows = pipeline(s, fwd, train, ratios)
    dpo, sft = rows[1][1]["policy"], rows[0][1]["policy"]
    head = "| method | " + " | ".join(STAGES) + " | total | total / DPO | with the policy's SFT / DPO's |"
    lines = [head + (" total EFLOP |" if flops else ""), "|---" * (len(STAGES) + 4 + flops) + "|"]
    for method, cost in rows:
        total = sum(cost.values())
        cells = [f"{100 * cost[k] / dpo:.1f}%" if k in cost else "-" for k in STAGES]
        shared = "-" if method.startswith("SFT") else f"{(total + sft) / (dpo + sft):.2f}"
        line = f"| {method} | " + " | ".join(cells) + f" | {100 * total / dpo:.1f}% | {total / dpo:.2f} | {shared} |"
        lines.append(line + (f" {total / 1e18:.2f} |" if flops else ""))
    even = break_even_share(s, fwd, train, ratios)
    lines += ["", "Oracle (or RM) share of the pairs at which the pipeline costs what DPO costs "
              f"(now {s.share:g}):", ""]
    for label, share in even.items():
        verdict = ("cheaper than DPO at any share" if share >= 1 else "dearer than DPO at any share" if share <= 0
                   else f"cheaper than DPO below a share of {share:.2f}")
        lines.append(f"- {label}: {verdict}")
    return "\n".join(lines) + "\n"


SWEEP = (("share 0.25", {"share": 0.25}), ("share 0.5", {"share": 0.5}), ("share 1", {"share": 1.0}),
         ("share 0.5, no small SFT", {"share": 0.5, "oracle_sft": False}),
         ("share 0.5, 2 policy epochs", {"share": 0.5, "epochs": 2}))


def sweep(s, fwd, train, ratios=None):
    """Markdown: total / DPO of every oracle-based pipeline under each setting of ``SWEEP`` (the rest as ``s``)."""
    settings = [(name, SimpleNamespace(**{**vars(s), **change})) for name, change in SWEEP]
    columns = [dict(pipeline(t, fwd, train, ratios)) for _, t in settings]
    lines = ["| method | " + " | ".join(name for name, _ in settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for method in columns[0]:
        if "oracle / RM" in columns[0][method]:
            cells = [f"{sum(c[method].values()) / c['DPO']['policy']:.2f}" for c in columns]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def assumptions(s):
    return (f"Policy {s.policy / 1e9:g}B parameters, oracle {s.oracle / 1e9:g}B (and 1/4, 1/16 of the policy), "
            f"{s.pairs:,} pairs of {s.tokens_per_seq} tokens per sequence (prompt + response; chosen and rejected: "
            f"2 sequences per pair), policy epochs {s.epochs}, oracle / token-RM epochs {s.oracle_epochs} on a share "
            f"{s.share:g} of the pairs, SFT {s.sft_epochs} epoch(s) on one sequence per pair, "
            f"small-model SFT {'counted' if s.oracle_sft else 'not counted (an SFT checkpoint of its size exists)'}.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", type=float, default=7e9, help="policy parameters")
    p.add_argument("--oracle", type=float, default=1.1e9, help="the paper's oracle parameters")
    p.add_argument("--pairs", type=int, default=60000)
    p.add_argument("--tokens_per_seq", type=int, default=512, help="prompt + response tokens per sequence")
    p.add_argument("--epochs", type=int, default=1, help="policy epochs (DPO, SimPO, SePO, TKPO)")
    p.add_argument("--oracle_epochs", type=int, default=1)
    p.add_argument("--share", type=float, default=0.5, help="share of the pairs the oracle / token RM trains on")
    p.add_argument("--sft_epochs", type=int, default=1)
    p.add_argument("--no_oracle_sft", dest="oracle_sft", action="store_false",
                   help="do not count the small model's SFT (its reference / the RM's start)")
    p.add_argument("--measure", action="store_true", help="measure per-token costs on this CPU first")
    p.add_argument("--tiny", action="store_true", help="with --measure: tiny sizes (a smoke test)")
    p.add_argument("--per_token", default="", help="per-token costs JSON (written by --measure)")
    p.add_argument("--per_token_out", default="", help="with --measure: write the per-token costs here")
    p.add_argument("--bench", default="", help="bench_gpu.py's JSON: policy-stage step ratios and scoring ratio")
    p.add_argument("--statistic", choices=["min_s", "median_s"], default="min_s")
    p.add_argument("--markdown", default="", help="also write the tables here")
    p.add_argument("--json", default="", help="write the stage costs here")
    return p.parse_args(argv)


def load_inputs(opts):
    """(per-token costs or None, bench ratios or None) from the flags (measuring first with --measure)."""
    per_token = None
    if opts.measure:
        per_token = measure_per_token(**(TINY_MEASURE if opts.tiny else {}))
        if opts.per_token_out:
            with open(opts.per_token_out, "w") as f:
                json.dump(per_token, f, indent=1)
    elif opts.per_token:
        with open(opts.per_token) as f:
            per_token = json.load(f)
    ratios = None
    if opts.bench:
        with open(opts.bench) as f:
            ratios = bench_ratios(json.load(f), opts.statistic)
    return per_token, ratios


def main(argv=None):
    """Print (and write) the FLOP-model table and, given measurements, the measured one; returns both as dicts."""
    opts = parse_args(argv)
    per_token, ratios = load_inputs(opts)
    out = ["## Assumptions", "", assumptions(opts), "", "## FLOP model (2N per token forward, 6N train)", "",
           table(opts, *unit_costs(), flops=True), "Total / DPO as the oracle's share, the small SFT and the epochs "
           "change (FLOP model):", "", sweep(opts, *unit_costs())]
    result = {"assumptions": vars(opts), "flop_model": dict(pipeline(opts, *unit_costs()))}
    if per_token or ratios:
        unit = (f"per-token costs measured ({per_token['machine']}, {per_token['torch_threads']} thread(s), "
                f"{per_token.get('clock', 'wall time')}, load average "
                f"{per_token['load_average_before'][0]:.1f} before, {per_token['load_average_after'][0]:.1f} after; "
                f"train / forward = {per_token['train_over_forward']:.2f})" if per_token
                else "per-token costs of the FLOP model")
        steps = (f"policy stages and scoring from bench_gpu step ratios ({opts.statistic}): " +
                 ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) if ratios else "no step ratios")
        out += [f"## Measured: {unit}; {steps}", "", table(opts, *unit_costs(per_token), ratios)]
        result.update(measured=dict(pipeline(opts, *unit_costs(per_token), ratios)), per_token=per_token,
                      ratios=ratios)
    text = "\n".join(out)
    print(text)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(text)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1, default=lambda x: x if math.isfinite(x) else None)
    return result


if __name__ == "__main__":
    main()
