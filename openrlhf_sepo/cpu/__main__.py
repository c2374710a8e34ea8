"""``python -m openrlhf_sepo.cpu MODULE [ARGS...]``: run an OpenRLHF-style entrypoint module without CUDA.

Works as one process (the rendezvous variables are set here when no launcher set them) and under
``torchrun --nproc_per_node N -m openrlhf_sepo.cpu MODULE ...`` (or DeepSpeed's launcher).
MODULE is run as ``__main__`` with ARGS as its command line, exactly as ``python -m MODULE ARGS``.
"""

import runpy
import sys

from openrlhf_sepo.cpu import patch_openrlhf_for_cpu, set_single_process_rendezvous

USAGE = "usage: python -m openrlhf_sepo.cpu MODULE [ARGS...]   e.g. openrlhf.cli.train_dpo --data.dataset ..."


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, args = argv[0], argv[1:]
    set_single_process_rendezvous()
    patch_openrlhf_for_cpu()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
