"""Run OpenRLHF's real DeepSpeed stack on a machine without CUDA.

OpenRLHF 0.11's ``DeepspeedStrategy`` assumes CUDA in a few spots that have a direct CPU meaning.
``patch_openrlhf_for_cpu()`` wraps exactly those, and nothing else, when CUDA is absent:

=====================================================  =========================================
OpenRLHF spot (openrlhf/utils/deepspeed/deepspeed.py)  on CPU
=====================================================  =========================================
``setup_distributed``: ``torch.cuda.set_device``        no-op (there is no device to select)
``setup_distributed``: ``init_device_mesh("cuda")``     ``init_device_mesh("cpu")`` (gloo)
``all_reduce`` / ``all_gather``: ``cuda.current_device`` the CPU device
``save_model`` / ``save_ckpt``: ``torch.cuda.synchronize``  no-op (CPU ops are synchronous)
=====================================================  =========================================

The patches are OpenRLHF touch points, so they live in ``openrlhf_sepo.openrlhf_internals``
(``patch_strategy_for_cpu``, ``CUDA_METHODS``, ``cuda_calls_on_cpu``); this package is the runtime's entrypoint.
DeepSpeed itself picks its CPU accelerator and the gloo backend (``DS_ACCELERATOR=cpu``).
On a machine with CUDA nothing is patched: behaviour on GPUs is OpenRLHF's, unchanged.
"""

import os

from openrlhf_sepo.openrlhf_internals import patch_strategy_for_cpu as patch_openrlhf_for_cpu

__all__ = ["patch_openrlhf_for_cpu", "free_port", "set_single_process_rendezvous"]


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_rendezvous() -> bool:
    """Without a launcher (no RANK in the environment), make this process rank 0 of a world of 1.

    DeepSpeed otherwise goes looking for MPI. Returns True if it set the variables.
    """
    if "RANK" in os.environ:
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return True
