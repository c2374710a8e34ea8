"""``python -m openrlhf_sepo.cli.score_report SCORES_DIR``: look at what the oracle/reference pair scored.

Writes ``SCORES_DIR/report/`` (or ``--out``): ``index.html`` (every response token shaded by its score, the tokens
SePO would train at ``--k`` marked) and ``scores.png`` (histograms). The report is ``openrlhf_sepo.score_report``.
"""

import argparse

from openrlhf_sepo.score_report import write_report  # noqa: F401  (also the old import path)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scores_dir", help="a score_tokens --output_dir")
    p.add_argument("--out", default=None, help="report dir (default SCORES_DIR/report)")
    p.add_argument("--k", type=float, default=0.3, help="selection ratio whose tokens are marked")
    p.add_argument("--num_pairs", type=int, default=12, help="pairs shown (a seeded random sample)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.k <= 1:
        raise SystemExit(f"--k must be in (0, 1], got {args.k}")
    path = write_report(args.scores_dir, args.out, args.k, args.num_pairs, args.seed)
    print(f"report written to {path}")
    return path


if __name__ == "__main__":
    main()
