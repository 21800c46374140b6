"""Activation checkpointing recomputes a forward during backward; that forward must not update the running
statistics a second time (PyTorch's own batch norm does: pytorch/pytorch#96136). A deliberate difference from
nn.BatchNorm: with torch.utils.checkpoint, reentrant or not, running_mean, running_var and num_batches_tracked
move once per step, as without checkpointing, and outputs and gradients are unchanged."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import tritonbn


def _block(device, momentum):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), tritonbn.BatchNormAct2d(4, momentum=momentum),
                          nn.Conv2d(4, 4, 1), tritonbn.BatchNormAct2d(4, activation="silu", momentum=momentum))
    return model.double().to(device)


def _steps(model, inputs, use_reentrant):
    results = []
    for x, dy in inputs:
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        y = model(x) if use_reentrant is None else checkpoint(model, x, use_reentrant=use_reentrant)
        y.backward(dy)
        results.append((y.detach(), x.grad, {name: p.grad.clone() for name, p in model.named_parameters()}))
    return results


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_steps_update_running_statistics_once(device, use_reentrant, momentum):
    plain = _block(device, momentum)
    checkpointed = copy.deepcopy(plain)
    inputs = [(torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device),
               torch.randn(2, 4, 5, 5, dtype=torch.float64, device=device)) for _ in range(3)]
    expected = _steps(plain, inputs, None)
    got = _steps(checkpointed, inputs, use_reentrant)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(checkpointed.state_dict(), plain.state_dict())
    assert int(checkpointed[1].num_batches_tracked) == 3


def test_functional_call_under_checkpoint_updates_once(device):
    x = torch.randn(4, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    running = [torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)]
    expected = [t.clone() for t in running]
    torch.nn.functional.batch_norm(x.detach(), *expected, training=True, momentum=0.5)

    def layer(inp):
        return tritonbn.batch_norm_act(inp, *running, training=True, momentum=0.5)

    checkpoint(layer, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(running, expected)


def test_a_forward_counts_as_recomputed_exactly_inside_a_backward(device):
    """What recomputing() asks is whether autograd's engine is running a backward: a plain training forward is
    not recomputed, and any forward inside a backward is, a backward hook's too (docs/api.md says so: such a
    forward leaves the running statistics alone, as a checkpoint's recomputation does)."""
    assert not tritonbn.functional.recomputing()
    seen = []
    x = torch.randn(3, 2, requires_grad=True, device=device)
    x.register_hook(lambda grad: seen.append(tritonbn.functional.recomputing()))
    (x * 2).sum().backward()
    assert seen == [True]  # inside a backward: what a checkpoint's recomputation sees too


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_compiled_module_under_checkpoint_then_plain_steps_update(device, use_reentrant):
    """A compiled module checkpointed from outside: reentrant checkpointing recomputes with gradients on, so
    Dynamo traces the module anew inside backward, where a forward is a recomputation. That answer must not be
    baked into the graph, which every later training forward with gradients on reuses: a plain step after it
    updates the running statistics and counts its batch, as nn.BatchNorm's does."""
    torch._dynamo.reset()
    module = tritonbn.BatchNormAct2d(3, momentum=None).double().to(device)
    compiled = torch.compile(module, backend="eager")
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    checkpoint(compiled, x, use_reentrant=use_reentrant).sum().backward()
    for step in range(2):
        batches, running_mean = int(module.num_batches_tracked), module.running_mean.clone()
        compiled(x * (step + 2) + 1).sum().backward()
        assert int(module.num_batches_tracked) == batches + 1, f"plain step {step}: batch not counted"
        assert not torch.equal(module.running_mean, running_mean), f"plain step {step}: running_mean not updated"
    torch._dynamo.reset()
