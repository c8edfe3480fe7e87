"""The MFU arithmetic the trainer's log, bench_train and the torchtitan anchor share, and the
benchmarks' step timing (time_steps: per-step times, the host's lead over the device)."""

import sys
import time
import types

import pytest
import torch

from cat_titan.train.metrics import (GpuSampler, host_lead, mfu, percent, step_time_stats, summarize_gpu_samples,
                                     time_steps)


def test_mfu_is_tokens_times_flops_over_the_devices_peak():
    # 150k tokens/s per device x 2.77 GFLOP per token on one 989 TFLOP/s device: 42.0%
    assert abs(mfu(150e3, 2.77e9, 989e12) - 150e3 * 2.77e9 / 989e12) < 1e-15
    # the trainer passes the total rate of all devices: 4 devices at 4x the rate, same MFU
    assert abs(mfu(4 * 150e3, 2.77e9, 989e12, devices=4) - mfu(150e3, 2.77e9, 989e12)) < 1e-15
    assert mfu(150e3, 2.77e9, None) is None  # CPU or an unknown GPU: no peak in the table
    assert percent(0.4201) == "42.0%" and percent(None) == "n/a"


def test_time_steps_on_cpu_times_every_step_and_has_no_host_lead():
    calls = []
    wall, times, outs, lead = time_steps(lambda: calls.append(time.sleep(0.01)) or len(calls), 4, torch.device("cpu"))
    assert outs == [1, 2, 3, 4] and len(times) == 4 and lead is None
    assert all(t >= 0.01 for t in times) and abs(sum(times) - wall) < 1e-3
    stats = step_time_stats(wall, times, 4)
    assert stats["step_s"] == times and "host_lead_s" not in stats


def test_host_lead_and_its_stats():
    # host returned from steps at 1, 2, 3 s; the device finished them at 5, 5.5, 3.2 s
    lead = host_lead([1.0, 2.0, 3.0], [5.0, 5.5, 3.2])
    assert [round(x, 9) for x in lead] == [4.0, 3.5, 0.2]
    stats = step_time_stats(3.2, [0.5, 0.5], 3, lead)
    assert stats["host_lead_s_min"] == lead[2] and stats["host_lead_s_median"] == 3.5


def test_gpu_samples_summary_counts_the_samples_at_the_power_limit():
    # session 11's H200 log, shortened: ramp to the 700 W cap, a clock dip, then held at the cap
    samples = [(0.0, 1980.0, 300.0), (0.1, 1710.0, 639.3), (0.2, 1485.0, 701.5), (0.3, 1725.0, 691.6),
               (0.4, 1740.0, 693.2)]
    g = summarize_gpu_samples(samples, 700.0)
    assert g["samples"] == 5 and g["sm_clock_mhz_min"] == 1485.0 and g["sm_clock_mhz_max"] == 1980.0
    assert abs(g["sm_clock_mhz_mean"] - (1980 + 1710 + 1485 + 1725 + 1740) / 5) < 1e-9
    assert g["power_w_max"] == 701.5
    assert g["at_power_limit_fraction"] == 3 / 5  # >= 679 W (97% of the limit)
    assert summarize_gpu_samples(samples, None)["at_power_limit_fraction"] is None  # limit unknown


def test_gpu_sampler_off_cuda_samples_nothing_and_says_why():
    with GpuSampler(torch.device("cpu")) as gpu:
        time.sleep(0.01)
    assert gpu.summary() is None and gpu.error == "not a CUDA device"


def test_gpu_sampler_initialises_nvml_once_per_context_not_per_sample(monkeypatch):
    """NVML stands in for a GPU this machine lacks (the CUDA test below reads a real one): the
    sampler must open NVML once, read one handle many times and close it once; torch.cuda's
    clock_rate/power_draw re-initialise NVML on every call."""
    calls = {"init": 0, "shutdown": 0, "reads": 0}

    class FakeNvml(types.ModuleType):
        NVML_CLOCK_SM = 1

        def nvmlInit(self):
            calls["init"] += 1

        def nvmlShutdown(self):
            calls["shutdown"] += 1

        def nvmlDeviceGetHandleByIndex(self, i):
            assert calls["init"] > calls["shutdown"], "handle asked for outside an init"
            return ("gpu", i)

        def nvmlDeviceGetClockInfo(self, h, kind):
            assert h == ("gpu", 0) and kind == 1
            calls["reads"] += 1
            return 1755

        def nvmlDeviceGetPowerUsage(self, h):
            return 650_000  # mW

        def nvmlDeviceGetEnforcedPowerLimit(self, h):
            return 700_000

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml("pynvml"))
    with GpuSampler(torch.device("cuda", 0), interval=0.001) as gpu:
        deadline = time.monotonic() + 10
        while calls["reads"] < 20 and gpu.error is None and time.monotonic() < deadline:
            time.sleep(0.001)
    g = gpu.summary()
    assert g is not None, gpu.error
    assert calls["init"] == 1 and calls["shutdown"] == 1
    assert g["samples"] >= 19 and g["sm_clock_mhz_min"] == 1755 and g["power_w_max"] == 650.0
    assert g["power_limit_w"] == 700.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gpu_sampler_reads_clock_and_power_while_open():
    """Needs nvidia-ml-py."""
    x = torch.randn(4096, 4096, device="cuda")
    with GpuSampler(torch.device("cuda"), interval=0.01) as gpu:
        for _ in range(200):
            y = x @ x  # noqa: F841  (load for the sampler to see)
        torch.cuda.synchronize()
    g = gpu.summary()
    assert g is not None, gpu.error
    assert g["samples"] >= 1 and 0 < g["sm_clock_mhz_min"] <= g["sm_clock_mhz_max"] and g["power_w_max"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_lead_tells_a_device_bound_step_from_a_host_bound_one():
    dev = torch.device("cuda")
    x = torch.ones(1, device=dev)
    torch.cuda.synchronize()

    def device_bound():  # queues ~10-30 ms of device work and returns at once
        torch.cuda._sleep(40_000_000)
        return x + 1

    def host_bound():  # the host takes 20 ms, the device a few microseconds
        time.sleep(0.02)
        return x + 1

    _, times, _, lead = time_steps(device_bound, 6, dev)
    assert len(times) == 5 and len(lead) == 6
    assert lead[-1] > 3 * min(times)  # the host queued every step long before the device got to it
    torch.cuda.synchronize()
    _, _, _, lead = time_steps(host_bound, 6, dev)
    assert max(lead) < 0.005  # each step's work ended right after the host queued it


def test_peak_flops_table_tells_pcie_and_nvl_parts_from_sxm():
    from cat_titan.train.metrics import peak_flops_of

    assert peak_flops_of("NVIDIA H200") == 989e12 and peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12  # datasheet dense bf16
    assert peak_flops_of("NVIDIA H100 NVL") == 835e12 and peak_flops_of("NVIDIA H200 NVL") == 835e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops_of("Some GPU") is None


def test_step_stats_of_a_single_cuda_step():
    # on CUDA one timed step has no interval between step ends: its wall time stands in
    stats = step_time_stats(0.25, [], 1, [0.1])
    assert stats["step_s_median"] == stats["step_s_min"] == stats["step_s_max"] == 0.25
