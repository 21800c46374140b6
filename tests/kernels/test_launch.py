"""The launcher: direct launches of a compiled kernel where Triton's internals allow, the ordinary launch
everywhere else. A fake compiled kernel stands in for CUDA, so both paths are tested on any machine."""

import functools

import torch

from tritonbn.kernels import launch
from tritonbn.kernels.launch import Launcher


class FakeCompiled:
    """What triton 3.x's JITFunction.run returns: a compiled kernel with its launcher and handles."""

    function = "cu-function"
    packed_metadata = ("metadata",)

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class FakeKernel:
    """A jit function: ``kernel.run(*args, grid=..., warmup=False, num_warps=...)`` launches the ordinary way (what
    ``kernel[grid](*args, num_warps=...)`` calls)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.ordinary = []

    def run(self, *args, grid, warmup, num_warps, **options):
        assert not warmup
        self.ordinary.append((grid, args, num_warps, options))
        return self.compiled


def test_first_call_compiles_then_launches_directly():
    compiled = FakeCompiled()
    kernel = FakeKernel(compiled)
    launcher = Launcher(kernel, (3, 2), 4)
    a, b = torch.empty(8), torch.empty(4)
    launcher(1234, a, b, 7, 0.5, "CONSTEXPR")
    launcher(1234, a, b, 7, 0.25, "CONSTEXPR")
    assert kernel.ordinary == [((3, 2, 1), (a, b, 7, 0.5, "CONSTEXPR"), 4, {})]
    # Triton's own launch after its binder: grid, stream, function, metadata, launch metadata and hooks, then
    # every kernel argument in order, constexprs included.
    assert compiled.launches == [(3, 2, 1, 1234, "cu-function", ("metadata",), None, None, None,
                                  a, b, 7, 0.25, "CONSTEXPR")]


def test_cooperative_launches_ask_triton_for_a_cooperative_grid():
    kernel = FakeKernel(None)
    Launcher(kernel, (3, 2), 8, cooperative=True)(None, torch.empty(4))
    assert kernel.ordinary[0][2:] == (8, {"launch_cooperative_grid": True})


def test_interpreter_and_unknown_tritons_take_the_ordinary_launch():
    for compiled in (None, object()):  # the interpreter returns nothing; another Triton lacks the handles
        kernel = FakeKernel(compiled)
        launcher = Launcher(kernel, (1,), 4)
        for _ in range(3):
            launcher(1234, torch.empty(4), 1.0)
        assert len(kernel.ordinary) == 3


def test_no_stream_means_the_ordinary_launch():
    """Off CUDA, or where the plan found a reason (below), calls pass no stream: Triton's own launch."""
    compiled = FakeCompiled()
    kernel = FakeKernel(compiled)
    launcher = Launcher(kernel, (1,), 4)
    launcher(None, torch.empty(4))
    launcher(None, torch.empty(4))
    assert len(kernel.ordinary) == 2 and compiled.launches == []
    launcher(1234, torch.empty(4))  # compiled once more, then direct
    launcher(1234, torch.empty(4))
    launcher(None, torch.empty(4))
    assert len(kernel.ordinary) == 4 and len(compiled.launches) == 1


def test_misaligned_pointers_and_launch_hooks_mean_no_direct_launch(monkeypatch):
    buffer = torch.empty(64)
    assert launch.direct_stream(1234, (buffer, None)) == 1234
    assert launch.direct_stream(1234, (buffer, buffer[1:])) is None  # 4 bytes off: another specialization
    assert launch.direct_stream(None, (buffer,)) is None  # no CUDA stream: not on a GPU
    monkeypatch.setattr(launch, "_launch_hooks_set", lambda: True)
    assert launch.direct_stream(1234, (buffer,)) is None


def test_current_stream_is_none_off_cuda():
    assert launch.current_stream(None) is None


def test_the_kernels_of_this_machine_launch(device):
    """The real kernels through a plan's launchers, twice: interpreted here (ordinary path), compiled on CUDA
    (the second call takes the direct path, with the tensors' addresses)."""
    from tritonbn.activations import KERNEL_IDS
    from tritonbn.kernels import ForwardPlan

    x = torch.randn(6, 3, 4, device=device)
    plan = ForwardPlan(x, None, None, None, None, None, True, KERNEL_IDS["identity"])
    for _ in range(2):
        y, workspace = plan(x, None, None, None, None, None, 0.1, 1e-5, 0.01)
        torch.testing.assert_close(workspace[:3], x.mean((0, 2)))
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_a_plan_passes_addresses_once_every_launcher_is_compiled(monkeypatch):
    """On the direct path the pointer arguments reach the compiled kernels as the tensors' addresses (from a
    tensor Triton's launcher would call data_ptr and the driver for each); the compiling launch gets tensors."""
    from tritonbn.activations import KERNEL_IDS
    from tritonbn.kernels import ForwardPlan

    x = torch.randn(6, 3, 4)
    plan = ForwardPlan(x, None, None, None, None, None, True, KERNEL_IDS["identity"])
    fakes = []
    for launcher, _ in plan.launches:
        compiled = FakeCompiled()
        kernel = FakeKernel(compiled)
        launcher.ordinary = functools.partial(kernel.run, grid=launcher.grid, warmup=False, **launcher.options)
        fakes.append((kernel, compiled))
    plan.index = 0  # as on CUDA device 0, whose current stream is 1234
    monkeypatch.setattr(launch, "_raw_stream", lambda index: 1234)
    monkeypatch.setattr(launch, "_launch_hooks_set", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # the counters ask
    outputs = [plan(x, None, None, None, None, None, 0.1, 1e-5, 0.01)[0] for _ in range(3)]
    pointers = 10  # x, y, residual, workspace, counters, weight, bias, running mean and variance, batches
    for kernel, compiled in fakes:
        (ordinary,) = kernel.ordinary
        assert all(isinstance(t, torch.Tensor) for t in ordinary[1][:pointers])
        assert len(compiled.launches) == 2  # the second and third calls
        for call, y in zip(compiled.launches, outputs[1:]):
            passed = call[9:9 + pointers]
            assert all(type(p) is int for p in passed)
            assert passed[0] == x.data_ptr() and passed[1] == y.data_ptr() and passed[2] == x.data_ptr()
            assert call[9 + pointers:] == ordinary[1][pointers:]  # floats and integer arguments as before
