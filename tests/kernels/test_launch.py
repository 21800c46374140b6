"""The launcher: direct launches of a compiled kernel where Triton's internals allow, the ordinary launch
everywhere else. A fake compiled kernel stands in for CUDA, so both paths are tested on any machine."""

import pytest
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
    """A jit function: ``kernel[grid](*args, num_warps=...)`` launches the ordinary way."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.ordinary = []

    def __getitem__(self, grid):
        def launch(*args, num_warps):
            self.ordinary.append((grid, args, num_warps))
            return self.compiled

        return launch


@pytest.fixture
def streams(monkeypatch):
    asked = []

    def get_stream(index):
        asked.append(index)
        return 1234

    monkeypatch.setattr(launch, "current_stream_getter", lambda: get_stream)
    return asked


def test_first_call_compiles_then_launches_directly(streams):
    compiled = FakeCompiled()
    kernel = FakeKernel(compiled)
    launcher = Launcher(kernel, (3, 2), 4, 2, device_index=0)
    a, b = torch.empty(8), torch.empty(4)
    launcher(a, b, 7, 0.5, "CONSTEXPR")
    launcher(a, b, 7, 0.25, "CONSTEXPR")
    assert kernel.ordinary == [((3, 2, 1), (a, b, 7, 0.5, "CONSTEXPR"), 4)]
    # Triton's own launch after its binder: grid, stream, function, metadata, launch metadata and hooks, then
    # every kernel argument in order, constexprs included.
    assert compiled.launches == [(3, 2, 1, 1234, "cu-function", ("metadata",), None, None, None,
                                  a, b, 7, 0.25, "CONSTEXPR")]
    assert streams == [0]


def test_interpreter_and_unknown_tritons_take_the_ordinary_launch(streams):
    for compiled in (None, object()):  # the interpreter returns nothing; another Triton lacks the handles
        kernel = FakeKernel(compiled)
        launcher = Launcher(kernel, (1,), 4, 1, device_index=0)
        for _ in range(3):
            launcher(torch.empty(4), 1.0)
        assert len(kernel.ordinary) == 3


def test_no_direct_launch_off_cuda_or_without_a_driver(monkeypatch):
    compiled = FakeCompiled()
    kernel = FakeKernel(compiled)
    Launcher(kernel, (1,), 4, 1, device_index=None)(torch.empty(4))  # a CPU tensor: no device index
    monkeypatch.setattr(launch, "current_stream_getter", lambda: None)
    launcher = Launcher(kernel, (1,), 4, 1, device_index=0)
    launcher(torch.empty(4))
    launcher(torch.empty(4))
    assert len(kernel.ordinary) == 3 and compiled.launches == []


def test_misaligned_pointers_and_launch_hooks_take_the_ordinary_launch(streams, monkeypatch):
    compiled = FakeCompiled()
    kernel = FakeKernel(compiled)
    launcher = Launcher(kernel, (1,), 4, 1, device_index=0)
    buffer = torch.empty(64)
    launcher(buffer)
    launcher(buffer[1:])  # 4 bytes off: Triton compiled another specialization for it
    assert len(kernel.ordinary) == 2 and compiled.launches == []
    monkeypatch.setattr(launch, "_launch_hooks_set", lambda: True)
    launcher(buffer)
    assert len(kernel.ordinary) == 3
    monkeypatch.setattr(launch, "_launch_hooks_set", lambda: False)
    launcher(buffer)
    assert len(compiled.launches) == 1


def test_the_kernels_of_this_machine_launch(device):
    """The real kernels through a plan's launchers, twice: interpreted here (ordinary path), compiled on CUDA
    (the second call takes the direct path)."""
    from tritonbn.activations import KERNEL_IDS
    from tritonbn.kernels import ForwardPlan

    x = torch.randn(6, 3, 4, device=device)
    plan = ForwardPlan(x, None, None, None, None, True, KERNEL_IDS["identity"])
    for _ in range(2):
        y, workspace = plan(x, None, None, None, None, None, 0.1, 1e-5, 0.01)
        torch.testing.assert_close(workspace[:3], x.mean((0, 2)))
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
