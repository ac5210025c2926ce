"""Optional Triton: the import shim, the launch helper and the launch counter shared by the op files.

`import kernels` must work where triton is not installed (CPU-only boxes run the PyTorch reference), yet the op
files define their `@triton.jit` kernels at module level. Without triton, `triton` and `tl` below are stand-ins
whose `jit` returns the plain function, so the definitions still run; launching one raises.

Not run directly; the op files import it.
"""

from __future__ import annotations

import collections
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
except ImportError:  # CPU-only installs: every op still works through its reference path
    HAS_TRITON = False
    InterpretedFunction = None

    class _TritonMissing:
        """Stands in for `triton` and `triton.language` so kernel definitions (and their annotations) parse."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda f: f)

    triton = _TritonMissing()
    tl = _TritonMissing()

# Kernel name -> number of launches in this process. Tests read it to prove the Triton path really ran.
LAUNCH_COUNTS: collections.Counter = collections.Counter()

_TRUE_WORDS = {"1", "true", "yes", "on"}


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks for the Triton interpreter (kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_WORDS


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Launch a `@triton.jit` kernel on `grid`, after checking it can run on these tensors, and count it.

    triton decides between the interpreter and the compiler when `triton.language` is first imported (its own
    helpers such as `tl.sum` are jit functions built at that moment), so TRITON_INTERPRET=1 set later cannot
    take effect in the same process. Say so plainly instead of failing deep inside triton.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use LATENTWIRE_KERNELS=reference (the PyTorch path)")
    interpreted = isinstance(kernel, InterpretedFunction)
    on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
    if on_cpu and not interpreted:
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter, but triton was imported without "
            "TRITON_INTERPRET=1. Set it in the environment before anything imports triton (e.g. run the "
            "process as `TRITON_INTERPRET=1 python ...`)."
        )
    if any(g <= 0 for g in grid):
        raise ValueError(f"empty launch grid {grid} for {kernel.fn.__name__}")
    if len(grid) > 1 and max(grid[1:]) > 65535:
        raise ValueError(f"grid {grid} for {kernel.fn.__name__}: CUDA limits grid axes 1 and 2 to 65535")
    kernel[grid](*args, **kwargs)
    LAUNCH_COUNTS[kernel.fn.__name__] += 1
