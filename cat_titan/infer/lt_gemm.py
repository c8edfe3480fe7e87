"""cuBLASLt GEMMs with a measured algorithm choice, for the decode step's skinny matmuls.

torch's ``mm`` runs the algorithm cuBLAS's heuristic ranks first. At the decode step's shapes
(M = batch rows, 64 at the benchmark; the weights streamed from HBM once per step) that pick
is tuned for neither, and every GEMM is a few microseconds above its weight's bandwidth time
(docs/benchmarks.md, session 18). Here cuBLASLt lists its candidate algorithms for one shape
(``cublasLtMatmulAlgoGetHeuristic``), each is timed in a CUDA graph over copies of the weight
that together overflow L2 (so each call streams its weight, as in a step), and the fastest is
kept if it beats torch's own GEMM timed the same way; otherwise torch's GEMM runs.

    y = lt_linear(x, w)              # x (M, K) @ w (N, K)^T
    lt_residual_linear_(x, a, w)     # x (M, N) += a (M, K) @ w (N, K)^T, in place (beta = 1)

Both are opaque custom ops (inductor neither splits nor copies them). Off CUDA, for
non-contiguous operands or other dtypes they are ``F.linear`` / ``addmm_``. A shape is tuned
at its first call outside CUDA-graph capture (the runners run each step eagerly before they
capture it); calls during a capture with no plan yet take torch's GEMM. Plans live in this
process (``plans()``); cuBLASLt is reached through ctypes, in the library torch loaded.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# cublasLt.h / library_types.h constants (stable across CUDA 12 and 13)
_COMPUTE_32F = 68
_CUDA_TYPE = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 14}
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_PREF_MAX_WORKSPACE = 1
_WORKSPACE = 32 << 20
_CANDIDATES = 32


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]  # cublasLtMatmulAlgo_t


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]  # cublasLtMatmulHeuristicResult_t


_lib = None


def _library():
    """libcublasLt (the one torch loaded: by soname first, then torch's nvidia wheels)."""
    global _lib
    if _lib is not None:
        return _lib
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    names += sorted(glob.glob(os.path.join(site, "nvidia", "**", "libcublasLt.so*"), recursive=True))
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("cuBLASLt not found (looked for libcublasLt.so.13/.12 and in torch's nvidia wheels)")
    vp, u64, i64, sz = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "cublasLtCreate": [vp],
        "cublasLtMatmulDescCreate": [vp, ctypes.c_int, ctypes.c_int],
        "cublasLtMatmulDescSetAttribute": [vp, ctypes.c_int, vp, sz],
        "cublasLtMatrixLayoutCreate": [vp, ctypes.c_int, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [vp],
        "cublasLtMatmulPreferenceSetAttribute": [vp, ctypes.c_int, vp, sz],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, vp, vp],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
    }
    for fn, argtypes in sigs.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = argtypes, ctypes.c_int
    _lib = lib
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


@dataclass(frozen=True)
class Shape:
    M: int
    N: int
    K: int
    accumulate: bool  # beta = 1 (into the output) or 0
    dtype: torch.dtype
    device: int


class Plan:
    """One shape's descriptors and chosen algorithm. Row-major y (M, N) = x (M, K) w (N, K)^T is
    column-major y^T (N x M) = op_T(w: K x N) x (x: K x M): torch's own TN layout."""

    def __init__(self, shape: Shape):
        lib = _library()
        self.shape = shape
        self.handle = _handle(shape.device)
        self.desc = self._new(lib.cublasLtMatmulDescCreate, _COMPUTE_32F, 0)  # fp32 compute and scale
        for attr, op in ((_DESC_TRANSA, 1), (_DESC_TRANSB, 0)):
            v = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "desc attribute")
        t = _CUDA_TYPE[shape.dtype]
        M, N, K = shape.M, shape.N, shape.K
        self.a = self._new(lib.cublasLtMatrixLayoutCreate, t, K, N, K)
        self.b = self._new(lib.cublasLtMatrixLayoutCreate, t, K, M, K)
        self.c = self._new(lib.cublasLtMatrixLayoutCreate, t, N, M, N)
        self.pref = self._new(lib.cublasLtMatmulPreferenceCreate)
        ws = ctypes.c_uint64(_WORKSPACE)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(self.pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws), 8),
               "preference")
        self.algo: Optional[_Heuristic] = None
        self.workspace = _workspace(shape.device)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if shape.accumulate else 0.0)

    @staticmethod
    def _new(create: Callable, *args) -> ctypes.c_void_p:
        h = ctypes.c_void_p()
        _check(create(ctypes.byref(h), *args), create.__name__)
        return h

    def candidates(self, n: int = _CANDIDATES) -> list[_Heuristic]:
        res = (_Heuristic * n)()
        got = ctypes.c_int(0)
        _check(_library().cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.c, self.c,
                                                         self.pref, n, res, ctypes.byref(got)), "heuristic")
        return [res[i] for i in range(got.value) if res[i].state == 0]

    def run(self, x: Tensor, w: Tensor, y: Tensor, algo: Optional[_Heuristic] = None) -> None:
        """y = x w^T (accumulate: y += x w^T) on the current stream."""
        h = algo or self.algo
        _check(_library().cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), w.data_ptr(), self.a, x.data_ptr(), self.b,
            ctypes.byref(self.beta), y.data_ptr(), self.c, y.data_ptr(), self.c, ctypes.byref(h.algo),
            self.workspace.data_ptr(), h.workspaceSize, torch.cuda.current_stream(self.shape.device).cuda_stream),
            "matmul")


_handles: dict[int, ctypes.c_void_p] = {}
_workspaces: dict[int, Tensor] = {}
_plans: dict[Shape, Optional[Plan]] = {}
_timings: dict[Shape, dict] = {}


def _handle(device: int) -> ctypes.c_void_p:
    if device not in _handles:
        with torch.cuda.device(device):
            h = ctypes.c_void_p()
            _check(_library().cublasLtCreate(ctypes.byref(h)), "create")
        _handles[device] = h
    return _handles[device]


def _workspace(device: int) -> Tensor:
    """One cuBLASLt workspace per device, shared by every plan: the plans of a step run one
    after another on one stream, as cuBLAS's own calls share its workspace."""
    if device not in _workspaces:
        _workspaces[device] = torch.empty(_WORKSPACE, dtype=torch.uint8, device=f"cuda:{device}")
    return _workspaces[device]


def plans() -> dict[Shape, dict]:
    """What was tuned in this process: per shape, torch's and the best candidate's time (us)."""
    return dict(_timings)


def _graph_us(fn: Callable[[], None], reps: int = 10) -> float:
    """Mean time of fn replayed from a CUDA graph, microseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def _torch_gemm(x: Tensor, w: Tensor, y: Tensor, accumulate: bool) -> None:
    if accumulate:
        y.addmm_(x, w.t())
    else:
        torch.mm(x, w.t(), out=y)


def tune(shape: Shape, min_gain: float = 0.02) -> Optional[Plan]:
    """Time every candidate against torch's GEMM on random operands of ``shape``; the plan of
    the fastest if it is at least ``min_gain`` faster, else None (torch's GEMM stays)."""
    dev = torch.device("cuda", shape.device)
    M, N, K = shape.M, shape.N, shape.K
    elt = torch.empty((), dtype=shape.dtype).element_size()
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    copies = max(2, min(32, -(-2 * l2 // (N * K * elt))))  # weights together > 2x L2: each call streams one
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(N, K, device=dev, dtype=shape.dtype, generator=g) * K ** -0.5 for _ in range(copies)]
    x = torch.randn(M, K, device=dev, dtype=shape.dtype, generator=g)
    ys = [torch.randn(M, N, device=dev, dtype=shape.dtype, generator=g) for _ in range(copies)]
    y0 = ys[0].clone()
    want = y0.clone()
    _torch_gemm(x, ws[0], want, shape.accumulate)
    base = _graph_us(lambda: [_torch_gemm(x, w, y, shape.accumulate) for w, y in zip(ws, ys)]) / copies
    try:
        plan = Plan(shape)
        candidates = plan.candidates()
    except RuntimeError as e:  # torch's GEMM runs; plans() says why (the CUDA tests fail on it)
        _timings[shape] = dict(torch_us=round(base, 2), best_us=None, error=str(e))
        return None
    best, best_us, agreed = None, float("inf"), 0
    tol = 1e-2 * want.abs().max().item() + 1e-6  # a sanity filter (summation order differs), not a bound
    for h in candidates:
        got = y0.clone()
        try:
            plan.run(x, ws[0], got, h)
            if (got.float() - want.float()).abs().max().item() > tol:
                continue
            agreed += 1
            us = _graph_us(lambda h=h: [plan.run(x, w, y, h) for w, y in zip(ws, ys)]) / copies
        except RuntimeError:
            continue
        if us < best_us:
            best, best_us = h, us
    _timings[shape] = dict(torch_us=round(base, 2), best_us=round(best_us, 2) if best else None,
                           candidates=len(candidates), agreed=agreed)
    if best is None or best_us > base * (1 - min_gain):
        return None
    plan.algo = best
    return plan


def prepare(rows: int, w: Tensor, accumulate: bool) -> None:
    """Tune the shape of a (rows, K) x w (N, K)^T call now (a runner does this for its steps'
    shapes before any step runs, so no tuning happens inside a graph's warm-up or capture)."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lt_gemm.prepare times GEMMs in CUDA graphs of its own; call it outside a capture")
    if _runs_on_lt(w, w.dtype):
        _plan_for(Shape(rows, w.shape[0], w.shape[1], accumulate, w.dtype, w.device.index))


def _runs_on_lt(t: Tensor, dtype: torch.dtype) -> bool:
    """An operand cuBLASLt takes here: a contiguous 2-d CUDA tensor of ``dtype``, one it has a type for."""
    return t.is_cuda and t.dtype == dtype and dtype in _CUDA_TYPE and t.dim() == 2 and t.is_contiguous()


def _plan_for(shape: Shape) -> Optional[Plan]:
    if shape not in _plans:
        if torch.cuda.is_current_stream_capturing():
            return None  # no timing inside a capture: torch's GEMM for this graph
        _plans[shape] = tune(shape)
    return _plans[shape]


def _plan(x: Tensor, w: Tensor, accumulate: bool) -> Optional[Plan]:
    if not (_runs_on_lt(x, x.dtype) and _runs_on_lt(w, x.dtype)):
        return None
    return _plan_for(Shape(x.shape[0], w.shape[0], w.shape[1], accumulate, x.dtype, x.device.index))


@torch.library.custom_op("cat_titan::lt_linear", mutates_args=())
def lt_linear(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) @ w (N, K)^T -> (M, N) with the shape's timed cuBLASLt algorithm (or F.linear)."""
    plan = _plan(x, w, accumulate=False)
    if plan is None:
        return F.linear(x, w)
    y = x.new_empty(x.shape[0], w.shape[0])
    plan.run(x, w, y)
    return y


@lt_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("cat_titan::lt_residual_linear_", mutates_args={"x"})
def lt_residual_linear_(x: Tensor, a: Tensor, w: Tensor) -> None:
    """x (M, N) += a (M, K) @ w (N, K)^T in place (beta = 1), timed algorithm or ``addmm_``."""
    plan = _plan(a, w, accumulate=True) if x.is_contiguous() else None
    if plan is None:
        x.addmm_(a, w.t())
    else:
        plan.run(a, w, x)


@lt_residual_linear_.register_fake
def _(x, a, w):
    return None
