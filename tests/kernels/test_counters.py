"""The ticket counters: one zeroed buffer per device and stream, left as found by every launch; inside a CUDA-graph
capture a call that finds none gets its own, which the graph zeroes (a capture records the zeroing, runs nothing)."""

import torch

from tritonbn.kernels import plan


def test_one_buffer_per_device_and_stream_grown_when_a_plan_needs_more(monkeypatch):
    monkeypatch.setattr(plan, "_COUNTERS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cpu = torch.device("cpu")
    first = plan.counters(cpu, None, 10)
    assert first.dtype == torch.int32 and not first.any()
    assert plan.counters(cpu, None, 10) is first
    assert plan.counters(cpu, 1234, 10) is not first  # another stream
    bigger = plan.counters(cpu, None, first.numel() + 1)
    assert bigger.numel() > first.numel() and plan.counters(cpu, None, 10) is bigger


def test_a_buffer_made_during_a_capture_is_not_kept(monkeypatch):
    monkeypatch.setattr(plan, "_COUNTERS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cpu = torch.device("cpu")  # stands in for the GPU: the logic is the same
    during = plan.counters(cpu, 1234, 10)
    assert plan.counters(cpu, 1234, 10) is not during
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    kept = plan.counters(cpu, 1234, 10)
    assert plan.counters(cpu, 1234, 10) is kept


def test_kernels_leave_the_counters_as_they_found_them(device):
    """After a training step every ticket is back at 0 (the barrier slot, 0 or 2**31 either way)."""
    import tritonbn

    x = torch.randn(4, 6, 5, 5, device=device, requires_grad=True)
    w = torch.rand(6, device=device, requires_grad=True)
    y = tritonbn.batch_norm_act(x, torch.zeros(6, device=device), torch.ones(6, device=device), w, None, True)
    torch.autograd.grad(y, (x, w), torch.randn_like(y))
    for (kind, _), (buffer, _) in plan._COUNTERS.items():
        if kind == x.device:
            assert not buffer[1:].any() and int(buffer[0]) in (0, -(2**31))
