"""The MFU arithmetic the trainer's log, bench_train and the torchtitan anchor share."""

from cat_titan.train.metrics import mfu, percent


def test_mfu_is_tokens_times_flops_over_the_devices_peak():
    # 150k tokens/s per device x 2.77 GFLOP per token on one 989 TFLOP/s device: 42.0%
    assert abs(mfu(150e3, 2.77e9, 989e12) - 150e3 * 2.77e9 / 989e12) < 1e-15
    # the trainer passes the total rate of all devices: 4 devices at 4x the rate, same MFU
    assert abs(mfu(4 * 150e3, 2.77e9, 989e12, devices=4) - mfu(150e3, 2.77e9, 989e12)) < 1e-15
    assert mfu(150e3, 2.77e9, None) is None  # CPU or an unknown GPU: no peak in the table
    assert percent(0.4201) == "42.0%" and percent(None) == "n/a"
