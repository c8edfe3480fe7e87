"""Look inside the decode step: the compiled graph's kernels and temporaries, a torch.profiler
trace with a top-kernels table, host syncs and recompiles. ``tools/bench_generate.py
--profile DIR`` writes all of it per configuration, so one GPU call answers what the CPU
analysis (docs/benchmarks.md, generation section) could only predict.

    code = decode_graph_code(model, runner, prompts, n, chunk_size)   # inductor's source, per graph
    summarize_graph_code(code, cache_tensor_bytes=...)                # kernels, temporaries
    profile_generation(model, runner, prompts, n, chunk_size, out_dir, label)
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional
from unittest import mock

import torch

from .generate import generate

# Inductor's generated wrapper code (CPU and CUDA): buffer allocations and kernel launches.
_ALLOC = re.compile(r"(\w+) = empty_strided_(?:cpu|cuda|xpu)\(\(([\d, ]*)\), \(([\d, ]*)\), torch\.(\w+)\)")
_KERNEL = re.compile(r"^\s+(cpp_fused_\w+)\(|^\s+(triton_\w+)\.run\(|^\s+(extern_kernels\.\w+)\(|"
                     r"^\s+.*?(torch\.ops\.\w+\.\w+)(?:\.\w+)?\(", re.M)
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "int64": 8, "long": 8, "int32": 4, "bool": 1,
                "int8": 1, "uint8": 1, "float64": 8}
# Host-side CUDA runtime calls worth counting per step (launch overhead and synchronisation).
HOST_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
              "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaStreamWaitEvent")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _call_body(code: str) -> str:
    """The ``call`` function of an inductor output module (what runs every step)."""
    start = code.find("def call(")
    end = code.find("def benchmark_compiled_module", start)
    return code[start:end if end > 0 else len(code)] if start >= 0 else code


def summarize_graph_code(codes: list[str], cache_tensor_bytes: int = 0) -> dict:
    """Kernels and temporary buffers of compiled graphs (inductor output code, CPU or CUDA).

    A temporary at least as large as one K (or V) cache tensor (``cache_tensor_bytes``) means
    the step copies a cache: the pattern the runners avoid (see runners.py)."""
    graphs = []
    for code in codes:
        body = _call_body(code)
        temps = []
        for name, shape, stride, dtype in _ALLOC.findall(body):
            size = [int(x) for x in shape.split(",") if x.strip()]
            strides = [int(x) for x in stride.split(",") if x.strip()]
            numel = 1 + sum((s - 1) * st for s, st in zip(size, strides)) if all(size) else 0
            temps.append({"buffer": name, "shape": size, "dtype": dtype,
                          "bytes": numel * _DTYPE_BYTES.get(dtype, 4)})
        kernels: dict[str, int] = {}
        for groups in _KERNEL.findall(body):
            name = next(g for g in groups if g)
            kind = ("fused" if name.startswith(("cpp_fused", "triton_")) else name)
            kernels[kind] = kernels.get(kind, 0) + 1
        temps.sort(key=lambda t: -t["bytes"])
        big = [t for t in temps if cache_tensor_bytes and t["bytes"] >= cache_tensor_bytes]
        graphs.append({"kernel_calls": sum(kernels.values()), "kernels": kernels, "temporaries": len(temps),
                       "temporary_bytes": sum(t["bytes"] for t in temps), "largest_temporaries": temps[:5],
                       "cache_sized_temporaries": big})
    return {"graphs": len(graphs), "per_graph": graphs}


@contextlib.contextmanager
def capture_graph_code() -> Iterator[list[str]]:
    """Collect inductor's output code of every graph compiled inside the block (the list is
    filled as graphs compile). The FX graph cache is bypassed so a graph compiled by an earlier
    process is still seen; graphs this process already holds are reused and not seen."""
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    # The hook inductor calls with each module's source (what torch._inductor.utils.run_and_get_code patches).
    with inductor_config.patch(fx_graph_cache=False), \
            mock.patch.object(GraphLowering, "save_output_code", lambda code: codes.append(code)):
        yield codes


def decode_graph_code(model, runner, prompts, n: int, chunk_size: Optional[int] = None
                      ) -> tuple[list[list[int]], list[str]]:
    """The tokens of generating ``n`` tokens with a compiled runner, and inductor's source code
    of its decode step(s), compiled meanwhile (crossing a chunk boundary compiles both
    variants). Dynamo is reset first (``torch._dynamo.reset``), so the graphs compile afresh."""
    if "decode" not in runner._compiled:
        raise ValueError("the runner's decode step is not compiled; call runner.compile_step() first")
    torch._dynamo.reset()
    with capture_graph_code() as codes:
        tokens = generate(model, prompts, n, chunk_size=chunk_size, runner=runner)
    return tokens, codes


def _cache_tensor_bytes(runner) -> int:
    return min(c.k.numel() * c.k.element_size() for c in runner.caches())


def _events(prof):
    return prof.key_averages()


def _is_kernel(e) -> bool:
    """A device-side event (kernel, copy): not a CPU op, which reports the time of the kernels
    it launched again, nor a profiler annotation (optimizer step, FSDP phase, a compiled
    graph's call), which spans its kernels' time."""
    return e.device_type.name == "CUDA" and "#" not in e.key and not e.key.startswith(("FSDP::", "## "))


def kernel_rows(prof, steps: int, device_type: str) -> list[dict]:
    """Per-op (CPU) or per-kernel (CUDA) totals of a profile, per step, heaviest first."""
    rows = []
    for e in _events(prof):
        if device_type == "cuda":
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = e.self_cuda_time_total
            if not t or not _is_kernel(e):
                continue
        else:
            t = e.self_cpu_time_total
            if not t:
                continue
        rows.append({"name": e.key, "calls_per_step": e.count / steps, "us_per_step": t / steps, "calls": e.count})
    total = sum(r["us_per_step"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["us_per_step"] / total
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


GAP_CLASSES = ((2.0, "under 2 us"), (20.0, "2-20 us"), (100.0, "20-100 us"), (float("inf"), "100 us and more"))


def idle_gaps(spans: list[tuple[float, float]], largest: int = 8) -> dict:
    """Device idle time between (start_us, end_us) spans of kernels and copies (overlaps
    merged): the total, by gap size, and the largest gaps with their offset from the first
    span. Small gaps are launch spacing; a few large ones point at the host."""
    spans = sorted(spans)
    if not spans:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "idle_ms_by_gap": {}, "largest_gaps": []}
    t0, end = spans[0][0], spans[0][1]
    gaps, busy = [], 0.0
    start = t0
    for a, b in spans[1:]:
        if a > end:
            gaps.append((a - end, end - t0))
            busy += end - start
            start = a
        end = max(end, b)
    busy += end - start
    by_class = {label: 0.0 for _, label in GAP_CLASSES}
    for g, _ in gaps:
        by_class[next(label for limit, label in GAP_CLASSES if g < limit)] += g / 1e3
    return {"span_ms": (end - t0) / 1e3, "busy_ms": busy / 1e3, "idle_ms": sum(g for g, _ in gaps) / 1e3,
            "idle_ms_by_gap": by_class,
            "largest_gaps": [{"us": g, "at_ms": at / 1e3} for g, at in sorted(gaps, reverse=True)[:largest]]}


def trace_device_spans(path: Path) -> list[tuple[float, float]]:
    """(start_us, end_us) of every kernel, copy and memset in a chrome trace (.json or .json.gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [(e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]


def host_call_counts(prof, steps: int) -> dict:
    counts = {e.key: e.count for e in _events(prof) if e.key in HOST_CALLS}
    return {k: v / steps for k, v in sorted(counts.items())}


def count_syncs(model, runner, prompts, n: int, chunk_size: Optional[int]) -> dict:
    """Synchronising CUDA calls while generating (``torch.cuda.set_sync_debug_mode('warn')``)."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        return {"checked": False, "reason": "not on CUDA"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, prompts, n, chunk_size=chunk_size, runner=runner)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    msgs = [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message)]
    return {"checked": True, "steps": n, "syncs": len(msgs), "per_step": len(msgs) / max(n, 1),
            "distinct": sorted(set(msgs))[:20]}


def _table(rows: list[dict], limit: int = 30) -> str:
    lines = ["| kernel / op | calls per step | us per step | share |", "| --- | ---: | ---: | ---: |"]
    for r in rows[:limit]:
        name = r["name"].replace("|", "/")
        name = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| `{name}` | {r['calls_per_step']:.2f} | {r['us_per_step']:.1f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines)


@torch.no_grad()
def profile_generation(model, runner, prompts, n: int, chunk_size: Optional[int], out_dir: Path, label: str,
                       graph_codes: Optional[list[str]] = None) -> dict:
    """Profile ``n`` decode steps on a warmed-up runner; write ``{label}.trace.json.gz`` (chrome
    trace), ``{label}.top.md`` (top kernels, host calls and syncs per step) and, given the
    compiled graphs' code (``capture_graph_code`` around the warm-up), ``{label}.graphs.py``
    and their summary. Returns the summary that goes into the .md file."""
    from torch.profiler import ProfilerActivity, profile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    generate(model, prompts, n, chunk_size=chunk_size, runner=runner)  # warm: nothing compiles below
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        generate(model, prompts, n, chunk_size=chunk_size, runner=runner)
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    trace = out_dir / f"{safe}.trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:  # perfetto / chrome://tracing read .gz
        shutil.copyfileobj(src, dst)
    trace.unlink()
    rows = kernel_rows(prof, n, device.type)
    summary = {"label": label, "steps": n, "device": device.type, "profiled_ms_per_step": 1e3 * wall / n,
               "device_us_per_step": sum(r["us_per_step"] for r in rows),
               "kernels_per_step": sum(r["calls_per_step"] for r in rows),
               "host_calls_per_step": host_call_counts(prof, n),
               "cache_tensor_bytes": _cache_tensor_bytes(runner), "top": rows[:30]}
    summary["syncs"] = count_syncs(model, runner, prompts, n, chunk_size)
    if graph_codes:
        (out_dir / f"{safe}.graphs.py").write_text(
            "\n\n# ======================== next graph ========================\n\n".join(graph_codes))
        summary["graph"] = summarize_graph_code(graph_codes, summary["cache_tensor_bytes"])
    elif "decode" in runner._compiled:
        summary["graph"] = {"error": "no graph compiled while capturing (reused from an earlier configuration "
                                     "of the same shapes in this process)"}
    (out_dir / f"{safe}.top.md").write_text(render_summary(summary))
    return summary


def render_summary(s: dict) -> str:
    unit = "device (CUDA kernels)" if s["device"] == "cuda" else "CPU ops (self time)"
    lines = [f"# decode step profile: {s['label']}", "",
             f"- {s['steps']} decode steps under torch.profiler: {s['profiled_ms_per_step']:.3f} ms/step wall "
             f"(profiler overhead included), {s['device_us_per_step']:.1f} us/step of {unit}, "
             f"{s['kernels_per_step']:.1f} {'kernels' if s['device'] == 'cuda' else 'ops'} per step"]
    if s["host_calls_per_step"]:
        calls = ", ".join(f"{k} {v:.2f}" for k, v in s["host_calls_per_step"].items())
        lines.append(f"- host CUDA calls per step: {calls}")
        syncs = sum(v for k, v in s["host_calls_per_step"].items() if k in SYNC_CALLS)
        lines.append(f"- explicit synchronisations per step: {syncs:.2f}")
    sy = s.get("syncs", {})
    if sy.get("checked"):
        lines.append(f"- sync debug mode: {sy['syncs']} synchronising calls in {sy['steps']} steps "
                     f"({sy['per_step']:.2f}/step)" + (": " + "; ".join(sy["distinct"]) if sy["distinct"] else ""))
    g = s.get("graph")
    if g and "error" not in g:
        for i, pg in enumerate(g["per_graph"]):
            big = pg["cache_sized_temporaries"]
            lines.append(f"- compiled graph {i}: {pg['kernel_calls']} kernel calls ({pg['kernels']}), "
                         f"{pg['temporaries']} temporaries, {pg['temporary_bytes'] / 2**20:.2f} MiB; "
                         f"cache-sized temporaries (>= {s['cache_tensor_bytes'] / 2**20:.2f} MiB): {len(big)}")
    elif g:
        lines.append(f"- compiled graph: not captured ({g['error']})")
    lines += ["", _table(s["top"]), ""]
    return "\n".join(lines)


def write_index(summaries: list[dict], out_dir: Path) -> None:
    """summary.json (everything) and summary.md (one line per configuration)."""
    out_dir = Path(out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summaries, indent=2, default=str))
    lines = ["| configuration | ms/step (profiled) | device us/step | kernels/step | syncs/step | graph temporaries "
             "| cache-sized temporaries |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        g = s.get("graph") or {}
        per = g.get("per_graph", [])
        temps = f"{sum(p['temporary_bytes'] for p in per) / 2**20:.2f} MiB" if per else "-"
        big = str(sum(len(p["cache_sized_temporaries"]) for p in per)) if per else "-"
        sy = s.get("syncs", {})
        syncs = f"{sy['per_step']:.2f}" if sy.get("checked") else "-"
        lines.append(f"| {s['label']} | {s['profiled_ms_per_step']:.3f} | {s['device_us_per_step']:.1f} | "
                     f"{s['kernels_per_step']:.1f} | {syncs} | {temps} | {big} |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


__all__ = ["capture_graph_code", "decode_graph_code", "kernel_rows", "profile_generation", "render_summary",
           "summarize_graph_code", "write_index"]
