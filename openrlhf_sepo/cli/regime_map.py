"""The regime map: where token-level credit pays, over the testbed's knobs (CPU, resumable).

``python -m openrlhf_sepo.cli.regime_map --output_dir regime_map`` runs the demo's benchmark (the testbed task,
``openrlhf_sepo.testbed``) once per cell of density x flaw rate x label noise x spurious cue, each cell in its own
subdir, with the settings tuned once at the grid's centre, and maps the paired differences in ground-truth reward
(docs/benchmark.md, "The regime map"). A rerun skips every finished cell.

This module is the front door only: the flags, then one call of ``openrlhf_sepo.bench.regime_map.run``.
"""

import argparse
import sys

from openrlhf_sepo.bench import regime_map


def _floats(text):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {text!r}") from None


def build_parser():
    p = argparse.ArgumentParser(description="The regime map: the demo's benchmark on a grid of testbed tasks (CPU).")
    p.add_argument("--output_dir", default="regime_map", help="the map's files, and a subdir per cell")
    for knob, flag in regime_map.AXES:
        default = regime_map.DEFAULT_GRID[knob]
        p.add_argument(f"--{flag}", type=_floats, default=default,
                       help=f"comma-separated values of the testbed's {knob} (default {','.join(f'{v:g}' for v in default)})")
    p.add_argument("--seeds", default=regime_map.DEFAULT_SEEDS,
                   help=f"comma-separated seeds of every cell (default {regime_map.DEFAULT_SEEDS}; at least 2, 5 or "
                        "more for intervals worth reading)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods of every cell (default: the comparisons' {','.join(regime_map.METHODS)}); "
                        "a comparison whose methods are not run is left out of the map")
    p.add_argument("--settings", default=None,
                   help="tuned settings used unchanged in every cell (default: bench/testbed_settings.json, tuned once "
                        "at the default testbed task, the grid's centre)")
    p.add_argument("--results_dir", default=None,
                   help="the map's durable record (docs: docs/results/regime_map): each finished cell's metrics.json "
                        "and wall time are copied there, the map written there, and a fresh --output_dir first "
                        "restores the cells kept there")
    p.add_argument("--quick", action="store_true", help="the harness's reduced sizes in every cell (a fast check)")
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks per launch")
    return p


def main(argv=None) -> int:
    regime_map.run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
