"""On CUDA with liger-kernel: cat_titan's fused linear cross-entropy equals the plain
logits -> cross_entropy computation (float32: loss and gradients to 1e-5 relative), scales
its gradients by the upstream gradient (gradient accumulation divides the loss), and never
synchronises with the host: neither forward (its own chunk loop) nor backward (torch's sync
debug mode raises if it does). The fallback for other liger versions (liger's own loop,
which counts labels with .item()) is checked for the same values."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs(n=1000, d=64, v=5000, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g, dtype=dtype)
    w = (torch.randn(v, d, device="cuda", generator=g) / d ** 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::7] = -100  # ignored positions
    return h.requires_grad_(), w.requires_grad_(), labels


@pytest.mark.parametrize("loop", ["own", "liger fallback"])
def test_fused_linear_cross_entropy_matches_plain_and_never_syncs(loop, monkeypatch):
    pytest.importorskip("liger_kernel", reason="needs liger-kernel")
    from cat_titan.models import common
    from cat_titan.models.common import FusedLinearCrossEntropy

    if loop == "own":
        assert common._liger_ce_kernel() is not None, "liger's kernel signature changed: update _LIGER_CE_ARGS"
    else:
        monkeypatch.setattr(common, "_liger_ce_kernel", lambda: None)
    h, w, labels = _inputs()
    ref = F.cross_entropy(h @ w.T, labels, ignore_index=-100)
    (ref * 0.25).backward()  # as one of 4 accumulated micro-batches
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error" if loop == "own" else "default")
    try:
        loss = FusedLinearCrossEntropy.apply(h, w, labels, -100)
        torch.cuda.set_sync_debug_mode("error")
        scaled = loss * 0.25
        scaled.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-4, atol=1e-6)


def test_output_head_fused_loss_under_autocast():
    """The head's fused path under bf16 autocast (fp32 weights and residual stream, as the
    trainer runs one GPU) follows the float32 loss to bf16 rounding (2e-2)."""
    pytest.importorskip("liger_kernel", reason="needs liger-kernel")
    from cat_titan.models.common import OutputHead

    torch.manual_seed(0)
    head = OutputHead(64, 5000, 1e-5, fused=True).cuda()
    head_plain = OutputHead(64, 5000, 1e-5, fused=False).cuda()
    head_plain.load_state_dict(head.state_dict())
    h, _, labels = _inputs()
    ref = head_plain(h.detach(), labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head(h, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert head.output.weight.grad.dtype == torch.float32
    assert abs(float(loss) - float(ref)) < 2e-2, (float(loss), float(ref))
