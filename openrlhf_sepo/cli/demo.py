"""The main job: a seeded, tuned comparison of SePO with DPO and SimPO on the embedded key-word task (CPU).

``python -m openrlhf_sepo.cli.demo --output_dir demo_output`` (README command 1, ``make demo``) trains and
evaluates every method of ``METHODS`` at its tuned setting (``bench/demo_settings.json``) on each seed of
``--seeds``; ``--sweep`` re-derives those settings on the validation prompts instead (docs/benchmark.md says how).

This module is the front door only: the flags, then one call of ``openrlhf_sepo.bench.keywords.run`` (the task spec,
``KeywordSpec``, run through the harness ``openrlhf_sepo.bench.runner``). Every job and stage is skipped when its
output is complete, so a rerun resumes. The names below are re-exported for their old import path.
"""

import argparse
import sys

import openrlhf_sepo  # noqa: F401  (flash-attn kernel placeholder before OpenRLHF)
from openrlhf_sepo import testbed, tiny
from openrlhf_sepo.bench.keywords import METHODS, SETTINGS_FILE, KeywordSpec, gated_reward, run
from openrlhf_sepo.bench.runner import point_label
from openrlhf_sepo.bench.stats import mean_ci95

grid_points = KeywordSpec().grid_points  # a method's grid (the spec's; the task flags do not change it)

__all__ = ["METHODS", "SETTINGS_FILE", "build_parser", "gated_reward", "grid_points", "main", "mean_ci95",
           "point_label"]


def build_parser():
    p = argparse.ArgumentParser(description="SePO vs DPO vs SimPO on the embedded key-word task, seeded and tuned (CPU).")
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--quick", action="store_true", help="reduced sizes and methods (the CI test of the pipeline)")
    p.add_argument("--sweep", action="store_true",
                   help="re-derive the tuned settings: every method on the grid, first seed, validation prompts")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, each redrawing data, models and runs (default 0,1,2; --quick: 0,1)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--settings", default=None,
                   help="tuned settings (a --sweep's sweep.json; default: the task's, bench/testbed_settings.json or, "
                        "for tiny's variants, bench/demo_settings.json)")
    p.add_argument("--task", default="testbed", choices=["testbed", *tiny.TASK_VARIANTS],
                   help="testbed (openrlhf_sepo.testbed, the knobs below) or one of tiny's saturated pair variants")
    p.add_argument("--label_noise", type=float, default=None,
                   help="fraction of training pairs flipped (default: testbed 0.1, tiny's variants 0)")
    t = p.add_argument_group("testbed knobs (--task testbed; openrlhf_sepo.testbed.Task, whose defaults they take)")
    task = testbed.Task()
    t.add_argument("--length", type=int, default=task.length, help="words per answer, about its tokens")
    t.add_argument("--density", type=float, default=task.density, help="key words per answer word (n_keys = density*length)")
    t.add_argument("--no_context", action="store_true",
                   help="key words right or wrong for every prompt (default: the prompt's reader decides)")
    t.add_argument("--flaw_rate", type=float, default=task.flaw_rate, help="share of pairs whose chosen answer holds wrong words")
    t.add_argument("--flaws", type=float, default=task.flaws,
                   help="share of a flawed pair's key slots flipped (chosen wrong, rejected right); < 0.5")
    t.add_argument("--cue", type=float, default=task.cue,
                   help="spurious cue: share of chosen answers' filler words that are cue words (0: off)")
    p.add_argument("--ood", action="store_true",
                   help="out-of-distribution data: the oracle's pairs from one half of the topics and filler words "
                        "(tiny.OOD_SLICES), the policies' pairs from the other")
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks per launch")
    p.add_argument("--oracle_lr", type=float, default=1e-4,
                   help="DPO learning rate of the oracle: gentle, so that its token rewards stay local")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.label_noise is not None and not 0.0 <= args.label_noise < 0.5:
        raise SystemExit(f"--label_noise must be in [0, 0.5), got {args.label_noise}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
