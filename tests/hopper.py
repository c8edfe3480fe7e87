"""Triton's view of a Hopper GPU on a machine without one.

``activate()`` makes Triton's driver report an sm_90 target, which is all that generating
TTIR (torch.compile's analysis of a user kernel) and compiling for sm_90 need; for checks run
in subprocesses: call it before anything builds a kernel. ``written(kernel, kw)`` is what
torch.compile believes the kernel writes: the tensors it would clone around each call if they
were not outputs. ``compile_for_hopper`` compiles a kernel ahead of time for sm_90 (ptxas from
triton's wheel), where ``HOPPER_OK`` (else ``HOPPER_WHY_NOT`` is the skip reason).
"""

from __future__ import annotations

import importlib
import importlib.util
import os


def activate() -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    class HopperTarget:  # no GPU here: the TTIR needs only a target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(HopperTarget())


def written(kernel, kw: dict) -> list[str]:
    """Names of the tensor arguments in kw that torch.compile's analysis finds written."""
    import torch
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if hasattr(tkw, "identify_mutated_tensors"):  # torch <= 2.11
        return sorted(tkw.identify_mutated_tensors(kernel, kw, {}))
    acc = tkw.identify_accessed_tensors(kernel, kw, {})  # later versions
    return sorted({d.name for d in acc.read_writes.writes if isinstance(kw.get(d.name), torch.Tensor)})


def _hopper_compiler() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        for module in ("triton.backends.compiler", "triton.backends.nvidia.compiler"):
            importlib.import_module(module)
    except ImportError as e:
        return False, f"triton's NVIDIA backend is not available ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 is set: the kernel is an interpreter function here"
    return True, ""


HOPPER_OK, HOPPER_WHY_NOT = _hopper_compiler()


def compile_for_hopper(kernel, ptrs: dict, const: dict, aligned: tuple = (), **options):
    """``kernel`` compiled ahead of time for sm_90 (ptxas from triton's wheel: no GPU needed)
    with the signature Triton's JIT specialises for contiguous tensors: ptrs' pointer types,
    the constexprs in const (unit strides among them), every other argument i32, and the
    pointers and the ``aligned`` sizes divisible by 16 (without that, no vectorised copies)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ptrs.get(n) or ("constexpr" if n in const else "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names
                           if n in ptrs or n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
