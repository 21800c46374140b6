"""torch.compile(fullgraph=True) of fused models: no graph break, and the same results as eager.

The tests run on the suite's device: on CUDA the compiled kernels inside the triton ops (whose kernels Inductor
launches itself), on CPU the kernels under the interpreter inside the custom ops that run eager's plans (trace
checks of the triton ops on a CPU: test_triton_ops.py). The "eager" and "aot_eager" backends keep compilation
fast; two tests go through the default inductor backend, one of them under CUDA graphs.
"""

import copy
import logging

import pytest
import torch
from _helpers import GraphRecorder
from functorch.compile import make_boxed_compiler
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import tritonbn


class Block(nn.Module):
    """conv-bn-leaky_relu, then conv-bn + skip followed by silu: a pair and a triple to fuse."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.act1 = nn.LeakyReLU(0.2)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return torch.nn.functional.silu(self.bn2(self.conv2(out)) + x)


def fused_block(device="cpu"):
    model = tritonbn.fuse(Block().double().to(device))
    assert len(model.tritonbn_fuse_report.fused) == 2
    with torch.no_grad():
        for name in ("bn1", "bn2"):
            bn = model.get_submodule(name)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model


def run_steps(model, inputs):
    results = []
    for x, dy in inputs:
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        y = model(x)
        y.backward(dy)
        # A compiled module names its parameters "_orig_mod.<name>".
        grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}
        results.append((y.detach(), x.grad, grads))
    return results


def assert_matches_eager(model, compiled, training, steps=2):
    eager = copy.deepcopy(model).train(training)
    compiled.train(training)
    device = next(model.parameters()).device
    inputs = [(torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device),
               torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device)) for _ in range(steps)]
    torch.testing.assert_close(run_steps(compiled, inputs), run_steps(eager, inputs))
    # Running statistics moved once per step, exactly as in eager.
    torch.testing.assert_close(model.state_dict(), eager.state_dict())


@pytest.mark.parametrize("training", [pytest.param(True, id="train"), pytest.param(False, id="eval")])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_matches_eager(device, backend, training):
    torch._dynamo.reset()
    model = fused_block(device).train(training)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert_matches_eager(model, compiled, training)
    assert int(model.bn1.num_batches_tracked) == (2 if training else 0)


@pytest.mark.kernels
@pytest.mark.parametrize("training", [pytest.param(True, id="train"), pytest.param(False, id="eval")])
def test_no_graph_breaks_and_kernel_ops_in_the_graph(device, training):
    torch._dynamo.reset()
    model = fused_block(device).train(training)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    forward_graphs, backward_graphs = GraphRecorder(), GraphRecorder()
    # AOTAutograd calls its compilers' functions with boxed (list) arguments.
    backend = aot_autograd(fw_compiler=make_boxed_compiler(forward_graphs),
                           bw_compiler=make_boxed_compiler(backward_graphs))
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    targets = forward_graphs.targets() + backward_graphs.targets()
    if device == "cuda":  # the triton ops: the graphs hold the kernels themselves, no tritonbn op
        assert any("triton_kernel_wrapper" in t for t in forward_graphs.targets())
        assert any("triton_kernel_wrapper" in t for t in backward_graphs.targets())
        assert not any(t.startswith("tritonbn.") for t in targets), targets
    else:  # interpreted kernels: the custom ops that run eager's plans, one each way per fused layer
        assert "tritonbn.forward.default" in forward_graphs.targets()
        assert "tritonbn.backward.default" in backward_graphs.targets()


def test_reference_path_compiles_natively():
    """CPU tensors under cpu_reference() (or wherever the kernels are compiled) take the reference path."""
    torch._dynamo.reset()
    model = fused_block()
    with tritonbn.cpu_reference():
        recorder = GraphRecorder()
        compiled = torch.compile(model, backend=recorder, fullgraph=True)
        assert_matches_eager(model, compiled, training=True)
    assert not any(target.startswith("tritonbn.") for target in recorder.targets())


class LogLines(logging.Handler):
    """Warnings torch logs while the block runs (torch's loggers need not propagate to the root)."""

    def __init__(self, *names):
        super().__init__(logging.WARNING)
        self.loggers, self.lines = [logging.getLogger(name) for name in names], []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self)


def test_inductor_training_step(device):
    torch._dynamo.reset()
    layer = tritonbn.BatchNormAct2d(3, activation="hardswish", dtype=torch.float64, device=device)
    compiled = torch.compile(layer, fullgraph=True)
    eager = copy.deepcopy(layer)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    with LogLines("torch._dynamo", "torch._inductor") as log:
        y = compiled(x, residual)
        grads = torch.autograd.grad(y, (x, residual, layer.weight, layer.bias), torch.ones_like(y))
    expected = eager(x, residual)
    torch.testing.assert_close(y, expected)
    expected_grads = torch.autograd.grad(expected, (x, residual, eager.weight, eager.bias), torch.ones_like(y))
    torch.testing.assert_close(grads, expected_grads)
    torch.testing.assert_close(layer.state_dict(), eager.state_dict())
    # Inductor learnt which arguments each kernel writes (else it copies every input around the kernels).
    assert not any("assuming every input is mutated" in line for line in log.lines), log.lines


def test_interpreted_kernels_reach_compile_through_the_custom_ops(monkeypatch):
    """Inductor cannot launch an interpreted kernel: the triton ops are traced only where the kernels are
    compiled, whatever the device (a CUDA tensor with TRITON_INTERPRET set takes the custom ops too)."""
    x = torch.empty(2, 3, 4, 4, device="meta")
    monkeypatch.setattr(tritonbn.ops, "kernels_interpreted", lambda: True)
    assert tritonbn.ops.kernel_ops(x) == (torch.ops.tritonbn.forward, torch.ops.tritonbn.backward)
    monkeypatch.setattr(tritonbn.ops, "kernels_interpreted", lambda: False)
    assert tritonbn.ops.kernel_ops(x) == (torch.ops.tritonbn.forward_kernels, torch.ops.tritonbn.backward_kernels)
    assert tritonbn.ops.kernel_ops(torch.empty(2, 3, 4, 4))[0] == torch.ops.tritonbn.forward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_training_steps_match_eager():
    """mode="reduce-overhead": forward and backward replayed from CUDA graphs, the running statistics updated
    once per step, every result equal to eager fused, and no step left out of the graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = fused_block("cuda")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with LogLines("torch._dynamo", "torch._inductor") as log:
        for _ in range(4):  # warm-up, recording, then replays
            x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device="cuda")
            dy = torch.randn_like(x)
            results = []
            for module in (compiled, eager):
                module.zero_grad(set_to_none=True)
                x_in = x.clone().requires_grad_()
                y = module(x_in)
                y.backward(dy)
                # Clones: a later replay reuses the graphs' output memory.
                grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in module.named_parameters()}
                results.append((y.detach().clone(), x_in.grad.clone(), grads))
            torch.testing.assert_close(*results)
    torch.testing.assert_close(model.state_dict(), eager.state_dict())
    assert counters["inductor"]["cudagraph_skips"] == 0, log.lines
    assert not any("assuming every input is mutated" in line for line in log.lines), log.lines


def test_clear_forgets_the_plans_compile_traced_too():
    """plans.clear() (after a configuration override, say) reaches torch.compile's plans as well as eager's."""
    from tritonbn import plans

    x = torch.empty(2, 3, 4, 4, device="meta")
    first = plans.traced_plan(x, None, None, None, None, None, True, "relu")
    assert plans.traced_plan(x, None, None, None, None, None, True, "relu") is first
    plans.clear()
    assert plans.traced_plan(x, None, None, None, None, None, True, "relu") is not first


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_momentum_none_compiles_in_one_graph(device, backend):
    """momentum=None (a cumulative average): the factor 1 / num_batches_tracked is taken on the device, so the
    layer traces with zero graph breaks (nn.BatchNorm2d's float(num_batches_tracked) cannot) and every step's
    output, gradients and running statistics equal eager's."""
    torch._dynamo.reset()
    layer = tritonbn.BatchNormAct2d(3, momentum=None, dtype=torch.float64, device=device)
    explanation = torch._dynamo.explain(copy.deepcopy(layer))(torch.randn(4, 3, 5, 5, dtype=torch.float64,
                                                                             device=device))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device) * 2 + 1
        dy = torch.randn_like(x)
        got = [compiled(x.requires_grad_()), None]
        (got[1],) = torch.autograd.grad(got[0], x, dy)
        expected = [eager(x), None]
        (expected[1],) = torch.autograd.grad(expected[0], x, dy)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(layer.state_dict(), eager.state_dict())
    assert int(layer.num_batches_tracked) == 3
