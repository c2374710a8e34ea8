"""Placeholder for flash-attn's compiled kernel module on machines where it cannot be built.

OpenRLHF imports ``flash_attn.bert_padding`` at import time (``openrlhf/models/ring_attn_utils.py``),
and ``flash_attn/__init__`` imports the CUDA extension ``flash_attn_2_cuda``. Without CUDA only the
pure-Python layer of flash-attn installs, so importing OpenRLHF would fail on the kernel module even
though no kernel is ever needed with sdpa or eager attention. We register a stand-in module that lets
the import succeed and raises a clear error the moment any kernel is actually called: flash-attn's
torch custom ops are registered for CUDA only, so a call with CPU tensors would otherwise stop in the
dispatcher with a list of backends; we give those ops a CPU kernel that raises the same clear error.
"""

import importlib.util
import sys
import types

KERNEL_MODULE = "flash_attn_2_cuda"
CUSTOM_OPS = ("_flash_attn_forward", "_flash_attn_varlen_forward", "_flash_attn_backward", "_flash_attn_varlen_backward")

HOW_TO_FIX = (
    "flash-attn's CUDA kernels are not available on this machine (no GPU or no compiled flash_attn_2_cuda), "
    "but a flash-attn kernel was called ({name}). Run with `--ds.attn_implementation sdpa` "
    "(or `eager`) and without `--ds.packing_samples` / `--ds.ring_attn_size`."
)


class FlashAttnUnavailableError(RuntimeError):
    """Raised when code calls a flash-attn kernel that this machine does not have."""


class _KernelPlaceholder(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):  # keep importlib / inspect / pickle probes working
            raise AttributeError(name)
        raise FlashAttnUnavailableError(HOW_TO_FIX.format(name=f"{KERNEL_MODULE}.{name}"))


def install_placeholder() -> bool:
    """Register the placeholder iff flash-attn's Python layer is installed and its kernel module is not.

    Returns True when the placeholder is (now) in place. A real kernel module is never shadowed.
    """
    if isinstance(sys.modules.get(KERNEL_MODULE), _KernelPlaceholder):
        return True
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec(KERNEL_MODULE) is not None:
        return False
    sys.modules[KERNEL_MODULE] = _KernelPlaceholder(KERNEL_MODULE)
    _register_cpu_kernels()
    return True


def _register_cpu_kernels():
    import flash_attn.flash_attn_interface  # noqa: F401  defines the flash_attn:: custom ops
    import torch

    for op in CUSTOM_OPS:
        def refuse(*args, _op=op, **kwargs):
            raise FlashAttnUnavailableError(HOW_TO_FIX.format(name=f"flash_attn::{_op}"))

        if hasattr(torch.ops.flash_attn, op):
            torch.library.register_kernel(f"flash_attn::{op}", "cpu", refuse)
