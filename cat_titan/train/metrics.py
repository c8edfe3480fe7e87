"""Console lines, metrics.jsonl, tensorboard events and MFU."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, TypeVar

import torch

T = TypeVar("T")

# Dense bf16 peak FLOP/s per device (vendor datasheets); used for MFU. Matched as substrings of
# the device name, first match wins: the PCIe and NVL parts before their SXM namesakes.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> Optional[float]:
    """The table's peak for a device name (None if it is not in the table)."""
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float], devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation: tokens/s x FLOPs per token over the devices' peak (None if unknown)."""
    return tokens_per_s * flops_per_token / (peak * devices) if peak else None


def percent(x: Optional[float]) -> str:
    """An MFU (or other fraction) for printing; "n/a" where it is unknown."""
    return f"{x:.1%}" if x is not None else "n/a"


class StepTimes(NamedTuple):
    wall: float
    """Seconds from the first step's call to the end of the last step's device work."""
    times: list[float]
    """Per-step seconds: on CUDA the n-1 intervals between the device's step ends, on CPU all n."""
    outs: list
    """The steps' return values."""
    host_lead: Optional[list[float]]
    """CUDA only: for each step, seconds between the host returning from ``step()`` (its work
    queued) and the device finishing that work. Near 0: the device waited for the host (host
    bound); about a step or more: the host was ahead. None on CPU (it runs in step())."""


def time_steps(step: Callable[[], T], n: int, device: torch.device) -> StepTimes:
    """Run ``step()`` n times with no host sync between steps and one at the end (benchmarks).
    The caller synchronises before, so the device is idle when the first step is called."""
    cuda = device.type == "cuda"
    outs, marks, host = [], [], []
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        start.record()  # runs at once on the idle device: device time 0 ~ host time 0
    t0 = time.perf_counter()
    for _ in range(n):
        outs.append(step())
        host.append(time.perf_counter() - t0)
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    if not cuda:
        return StepTimes(wall, [b - a for a, b in zip([0.0] + host, host)], outs, None)
    ends = [start.elapsed_time(m) / 1e3 for m in marks]  # device seconds since start
    return StepTimes(wall, [b - a for a, b in zip(ends, ends[1:])], outs, host_lead(host, ends))


def host_lead(host_done: list[float], device_done: list[float]) -> list[float]:
    """How far the host was ahead of the device at each step: the device's end of step i
    minus the host's return from step i (both seconds from one origin)."""
    return [d - h for h, d in zip(host_done, device_done)]


def step_time_stats(wall: float, times: list[float], n: int, lead: Optional[list[float]] = None) -> dict:
    """The step-time spread the benchmarks report (seconds), every step's time, and (CUDA)
    the host's lead over the device at the step ends."""
    times = times or [wall / n]  # CUDA, one step: no interval between step ends
    stats = {"step_s_mean": wall / n, "step_s_median": statistics.median(times), "step_s_min": min(times),
             "step_s_max": max(times), "step_s_p90": sorted(times)[int(0.9 * (len(times) - 1))], "step_s": times}
    if lead is not None:
        stats.update(host_lead_s=lead, host_lead_s_min=min(lead), host_lead_s_median=statistics.median(lead))
    return stats


def summarize_gpu_samples(samples: list[tuple[float, float, float]], power_limit_w: Optional[float]) -> dict:
    """(seconds, SM clock MHz, power W) samples -> what a benchmark reports about the GPU's state."""
    clocks, watts = [c for _, c, _ in samples], [w for _, _, w in samples]
    out = {"samples": len(samples), "sm_clock_mhz_mean": statistics.mean(clocks), "sm_clock_mhz_min": min(clocks),
           "sm_clock_mhz_max": max(clocks), "power_w_mean": statistics.mean(watts), "power_w_max": max(watts),
           "power_limit_w": power_limit_w, "at_power_limit_fraction": None}
    if power_limit_w:  # within 3% of the enforced limit: the power controller is holding the clock down
        out["at_power_limit_fraction"] = sum(w >= 0.97 * power_limit_w for w in watts) / len(watts)
    return out


class GpuSampler:
    """The SM clock and power draw of one GPU, sampled by a thread every ``interval`` seconds
    while the context is open (NVML; needs nvidia-ml-py). A training step of the reference-sized
    CAT holds an H200 at its 700 W limit, where the clock runs 10-15% under its maximum and dips
    further for a moment about one second into the load (docs/benchmarks.md, session 11): the
    summary tells a slow machine from a slow step. ``summary()`` is None off CUDA or without
    NVML (``error`` says why)."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval = device, interval
        self.samples: list[tuple[float, float, float]] = []
        self.error: Optional[str] = None
        self.power_limit_w: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._nvml = self._handle = None

    def _read(self) -> tuple[float, float]:  # MHz, W
        nvml, h = self._nvml, self._handle
        return float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)), nvml.nvmlDeviceGetPowerUsage(h) / 1e3

    def __enter__(self) -> "GpuSampler":
        if self.device.type != "cuda":
            self.error = "not a CUDA device"
            return self
        try:  # NVML once per context, not per sample (torch.cuda.clock_rate re-initialises it per call)
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            # NVML numbers GPUs physically; this maps through CUDA_VISIBLE_DEVICES
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(self.device))
            self._read()
        except Exception as e:  # no nvidia-ml-py, or NVML refused
            self.error = f"{type(e).__name__}: {e}"
            self._close()
            return self
        try:
            self.power_limit_w = self._nvml.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1e3
        except Exception:  # optional detail: some parts and drivers refuse it
            pass
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            try:
                clock, watts = self._read()
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            self.samples.append((time.perf_counter() - t0, clock, watts))
            self._stop.wait(self.interval)

    def _close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()  # NVML counts inits; this one is ours
            except Exception:
                pass
            self._nvml = self._handle = None

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._close()

    def summary(self) -> Optional[dict]:
        return summarize_gpu_samples(self.samples, self.power_limit_w) if self.samples else None


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that only keeps time."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: str, total_steps: int,
                 purge_after: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # events of steps after purge_after (the step this run starts from) were logged by
                # an interrupted attempt; this run logs them again
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_after + 1)
            except ImportError:  # tensorboard is a dependency; degrade with a note if absent
                print("[metrics] tensorboard not installed: event files disabled", file=sys.stderr)
        interactive = sys.stdout.isatty()
        self.progress = enabled and (progress == "on" or (progress == "auto" and interactive))
        self.start = time.time()

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
        step = row["step"]
        eta = (time.time() - self.start) / max(1, step - row.get("start_step", 0)) * (self.total_steps - step)
        parts = [f"step {step:>6d}/{self.total_steps}"]
        for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("tokens_per_sec", "{:,.0f}"),
                         ("mfu", "{:.1%}"), ("peak_mem_gb", "{:.1f}GB"), ("chunk_size", "{}")):
            if row.get(key) is not None:
                parts.append(f"{key} " + fmt.format(row[key]))
        parts.append(f"eta {eta / 60:.1f}m")
        self.clear_progress()
        print(" | ".join(parts), flush=True)

    def log_eval(self, step: int, losses: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "eval": True, **{f"val_loss{k}": v for k, v in losses.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in losses.items():
                self.tb.add_scalar(f"val_loss{k}", v, step)
        self.clear_progress()
        print(f"eval step {step}: " + ", ".join(f"val_loss{k} {v:.4f}" for k, v in losses.items()), flush=True)

    def show_progress(self, step: int, loss: float) -> None:
        if self.progress:
            sys.stdout.write(f"\r  step {step}/{self.total_steps} loss {loss:.4f} ")
            sys.stdout.flush()

    def clear_progress(self) -> None:
        if self.progress:
            sys.stdout.write("\r\033[K")

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
