"""``python -m openrlhf_sepo.cli.train_ppo_dense``: OpenRLHF's own Ray PPO (``openrlhf.cli.train_ppo_ray``, every
flag of it, same names and defaults) with dense (per-token) rewards, ``--dense.*``.

``--dense.source none`` is OpenRLHF's PPO unchanged. Without CUDA or vLLM (a CPU machine) the run goes through this
package's CPU runtime: the log's ``[train_ppo_dense] generation engine: ...`` line names the engine that generated.
The run is ``openrlhf_sepo.ppo_dense_run.run``.
"""

import sys


def main(argv=None) -> int:
    from openrlhf_sepo.ppo_dense_run import run

    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
