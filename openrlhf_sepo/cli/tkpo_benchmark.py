"""TKPO against SFT and DPO on the embedded style task, seeded and tuned (CPU): ``python -m
openrlhf_sepo.cli.tkpo_benchmark --output_dir tkpo_output`` (docs/tkpo.md says what it measures).

This module is the front door only: the flags, then one call of ``openrlhf_sepo.bench.style.run`` (the task spec,
``StyleSpec``, whose docstring describes the task and the methods, run through the harness
``openrlhf_sepo.bench.runner``). The names below are re-exported for their old import path.
"""

import argparse
import sys

from openrlhf_sepo.bench.style import METHODS, SETTINGS_FILE, StyleSpec, run

grid_points = StyleSpec().grid_points  # a method's grid (the spec's)

__all__ = ["METHODS", "SETTINGS_FILE", "build_parser", "grid_points", "main"]


def build_parser():
    p = argparse.ArgumentParser(description="TKPO vs SFT vs DPO on the embedded style task, seeded and tuned (CPU).")
    p.add_argument("--output_dir", default="tkpo_output")
    p.add_argument("--quick", action="store_true", help="reduced sizes and methods (the CI test of the pipeline)")
    p.add_argument("--sweep", action="store_true", help="choose the settings on validation prompts (first seed)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0,1)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--settings", default=SETTINGS_FILE, help="tuned settings (a --sweep's sweep.json)")
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks per launch")
    return p


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
