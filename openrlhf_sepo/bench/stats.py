"""The benchmarks' statistics: the mean over seeds with its 95% interval, and paired differences.

Every number a benchmark reports is a mean over seeds +- the half-width of the 95% Student-t interval of the mean
(``mean_ci95``). A paired difference ``a - b`` is computed seed by seed: both methods saw the same data, start model
and prompts on a seed, so its interval is narrower than the two intervals side by side suggest.
"""

import math

# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1); 1.96 (the normal's) past 10.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci95(values):
    """(mean, half-width of the 95% Student-t interval of the mean) of per-seed values; half-width NaN for one."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def paired_ci95(a, b):
    """``mean_ci95`` of the seed-by-seed differences ``a[i] - b[i]``."""
    return mean_ci95([x - y for x, y in zip(a, b)])


def summarize(per_seed: dict) -> dict:
    """{metric: {model: [per-seed values]}} -> {metric: {model: (mean, half-width)}}."""
    return {metric: {m: mean_ci95(v) for m, v in values.items()} for metric, values in per_seed.items()}


def paired_differences(per_seed: dict, comparisons) -> dict:
    """{"a - b": {"mean", "ci95"}} for each (a, b) of ``comparisons`` with both in ``per_seed`` ({model: per-seed
    values of one metric}), in the order of ``comparisons``."""
    return {f"{a} - {b}": dict(zip(("mean", "ci95"), paired_ci95(per_seed[a], per_seed[b])))
            for a, b in comparisons if a in per_seed and b in per_seed}


def format_ci(mean, half_width, digits=3, signed=False) -> str:
    """``0.123 ± 0.045`` (``+0.123`` when ``signed``); the mean alone when the half-width is NaN (one seed)."""
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if half_width != half_width else f"{text} ± {half_width:.{digits}f}"


def excludes_zero(mean, half_width) -> bool:
    """Whether the 95% interval ``mean ± half_width`` excludes 0 (never with a NaN half-width: one seed)."""
    return half_width == half_width and abs(mean) > half_width


def reading(mean, half_width) -> str:
    """How the report reads a paired difference: its interval excludes 0, or it does not."""
    return "interval excludes 0" if excludes_zero(mean, half_width) else "not distinguishable"


def non_finite(metrics: dict) -> list:
    """The dotted keys of ``metrics``' numbers that are not finite, the top-level ``ci95`` intervals aside (NaN
    with one seed)."""
    return [k for k, v in _flatten(metrics).items() if not math.isfinite(v) and not k.startswith("ci95.")]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out
