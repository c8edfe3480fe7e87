"""Triton's view of a Hopper GPU on a machine without one, for checks run in subprocesses.

``activate()`` makes Triton's driver report an sm_90 target, which is all that generating
TTIR (torch.compile's analysis of a user kernel) and compiling for sm_90 need. Call it before
anything builds a kernel. ``written(kernel, kw)`` is what torch.compile believes the kernel
writes: the tensors it would clone around each call if they were not outputs.
"""

from __future__ import annotations


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
