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

DeepSpeed itself picks its CPU accelerator and the gloo backend (``DS_ACCELERATOR=cpu``).
On a machine with CUDA nothing is patched: behaviour on GPUs is OpenRLHF's, unchanged.
"""

import contextlib
import functools
import os

import torch

_PATCHED_FLAG = "_openrlhf_sepo_cpu_patched"
# DeepspeedStrategy methods that call torch.cuda.* directly or through torch_dist_barrier_and_cuda_sync.
_CUDA_METHODS = ("setup_distributed", "all_reduce", "all_gather", "save_model", "save_ckpt")


def cuda_available() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def _cuda_calls_on_cpu():
    """Within the block, the three torch.cuda calls OpenRLHF makes mean 'the CPU'.

    Each of them would raise 'Torch not compiled with CUDA enabled' here, so giving them a CPU
    meaning cannot change a run that would otherwise have worked.
    """
    saved = (torch.cuda.set_device, torch.cuda.current_device, torch.cuda.synchronize)
    torch.cuda.set_device = lambda device=None: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.set_device, torch.cuda.current_device, torch.cuda.synchronize = saved


def _on_cpu(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _cuda_calls_on_cpu():
            return method(*args, **kwargs)

    return wrapper


def _cpu_device_mesh(init_device_mesh):
    @functools.wraps(init_device_mesh)
    def wrapper(device_type, *args, **kwargs):
        return init_device_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    return wrapper


def patch_openrlhf_for_cpu() -> bool:
    """Patch OpenRLHF's CUDA-only spots for a CUDA-less machine. Idempotent.

    Returns True if the patches are active, False on a CUDA machine (where nothing is touched).
    """
    if cuda_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import openrlhf_sepo  # noqa: F401  (flash-attn kernel placeholder, before OpenRLHF imports it)
    from openrlhf.utils.deepspeed import deepspeed as ds_module

    strategy_cls = ds_module.DeepspeedStrategy
    if getattr(strategy_cls, _PATCHED_FLAG, False):
        return True
    for name in _CUDA_METHODS:
        setattr(strategy_cls, name, _on_cpu(getattr(strategy_cls, name)))
    ds_module.init_device_mesh = _cpu_device_mesh(ds_module.init_device_mesh)
    setattr(strategy_cls, _PATCHED_FLAG, True)
    return True


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
