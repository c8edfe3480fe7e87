"""Programmatic dependent launch (PDL) for the decode step's own kernels (Hopper and later).

A batch-64 decode step is a chain of ~5 small kernels per layer, each of which streams one
weight (docs/benchmarks.md: 4-7 us per matmul however small its weight, ~700 us per CAT-32
step against ~200 us of weight bytes at full bandwidth). Between two kernels of a CUDA graph
the GPU drains the first grid, launches the second and ramps up its loads. With PDL the next
kernel is launched while the current one runs:

* every program of a PDL kernel first waits for the previous kernel of the stream to finish
  (``gdc_wait``: its writes are then visible), and only then reads anything that kernel could
  have written (activations, caches, split-K counters and workspaces) or writes anything;
* right after its wait it allows the next kernel to launch (``gdc_launch_dependents``), so at
  most one kernel ahead is resident and waiting, never a cascade of them;
* mode "late": the same wait, but the next kernel may launch only once this program is past
  its main loop (before its epilogue; the attention kernel: before its store). An early
  launch parks the next grid's programs on the SMs, blocked in their wait, while this grid
  may still have programs to place: "late" keeps them off until this grid's work is placed
  and nearly done, and still hides the next launch behind the epilogues and the tail;
* mode "prefetch": was for the fused decode linears (removed; git history at 3c1516e), which
  asked L2 for their weight slice before the wait; the attention kernel has no weight and
  launches as "wait".

Because every program of every PDL kernel waits, a kernel that finishes has seen its own
predecessor finish: a read two kernels back is ordered as well. Kernels without PDL (cuBLAS,
inductor's) are ordinary stream order on either side.

The decode kernels take the PDL launch only outside torch.compile's code generation:
inductor launches user Triton kernels without launch attributes, so with PDL on the ops
are opaque custom ops (``decode_attention_pdl``) that launch the kernel themselves.
Inductor's own kernels have their own switch (``torch._inductor.config.triton.enable_pdl``;
``tools/bench_generate.py --pdl`` sets both).

Status (docs/benchmarks.md, sessions 13 and 14): correct (outputs bit-identical to PDL off;
the CUDA generation tests pass). 12 fused decoder layers in one CUDA graph (chunk 32, batch
64), us per layer: on an H100, 78 off, 95 'wait', 101 'prefetch'; on an H200 with tuned tiles,
64.9 off, 64.9 'wait', 67.4 'prefetch', 62.9 'late'. 'late' is the best mode, but the fused
chain stays slower than the unfused ops (50.2), so PDL is off by default.
"""

from __future__ import annotations

import os

import torch

try:  # grid dependency control (triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

    _GDC_ERROR = None
except ImportError as e:  # pragma: no cover - old triton, or none
    _GDC_ERROR = e

MODES = ("off", "wait", "prefetch", "late")
ENV = "CAT_TITAN_PDL"

_mode: str | None = None  # None: not set yet, read ENV on first use


def check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}: unknown PDL mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def set_mode(mode: str) -> None:
    """'off' (default), 'wait' (PDL launch, every program waits before its first dependent
    access and then lets the next kernel launch), 'prefetch' ('wait', and the program's weight
    slice is prefetched into L2 before the wait) or 'late' ('wait', but the next kernel may
    launch only after the program's main loop)."""
    global _mode
    _mode = check_mode(mode, "pdl.set_mode")


def mode() -> str:
    global _mode
    if _mode is None:
        _mode = check_mode(os.environ.get(ENV, "off") or "off", f"environment variable {ENV}")
    return _mode


def supported(device: torch.device | str | int | None = None) -> tuple[bool, str]:
    """Can kernels on this device take a PDL launch? (ok, why not)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return False, f"compute capability {major}.{minor} (PDL needs 9.0, Hopper, or later)"
    if _GDC_ERROR is not None:
        return False, f"this triton has no grid dependency control ({_GDC_ERROR})"
    return True, ""


def active(t: torch.Tensor) -> bool:
    """PDL launches for a kernel on t's device: a mode is on and the device supports it."""
    return mode() != "off" and t.is_cuda and _supported_index(t.device.index or 0)


def trigger(mode: str) -> int:
    """The kernels' PDL constexpr: 0 no grid dependency control, 1 wait then let the next
    kernel launch at once, 2 wait, and let it launch after the main loop ('late')."""
    return {"off": 0, "late": 2}.get(check_mode(mode, "pdl.trigger"), 1)


def launch_args(mode: str, t: torch.Tensor, where: str) -> dict:
    """A launcher's PDL settings for a kernel on t's device: the ``PDL`` constexpr
    (``trigger``) and, with a mode on, Triton's ``launch_pdl`` attribute. Refuses an unknown
    mode, and a PDL launch off CUDA, before any kernel runs."""
    if check_mode(mode, where) != "off" and not t.is_cuda:
        raise ValueError(f"{where}: a PDL launch (mode {mode!r}) needs a CUDA device of compute capability 9.0 or "
                         f"later; the input is on {t.device} (launch with pdl_mode='off')")
    return dict(PDL=trigger(mode), **({"launch_pdl": True} if mode != "off" else {}))


def launch_mode(t: torch.Tensor) -> str:
    """The mode a kernel on t's device launches with: ``mode()`` where ``active(t)``, else 'off'."""
    return mode() if active(t) else "off"


_SUPPORTED: dict[int, bool] = {}


@torch._dynamo.assume_constant_result  # traced in the decode step: evaluated once, eagerly
def _supported_index(index: int) -> bool:
    if index not in _SUPPORTED:
        _SUPPORTED[index] = supported(index)[0]
    return _SUPPORTED[index]
