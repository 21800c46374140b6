"""tritonbn.fuse / unfuse on models with hooks, in float64.

Every hook must run as in the original model and see the same values: the hooks here change what they
see (double an output, shift an input, double a gradient), so a hook that is dropped, or that sees a
fused value, changes the outputs or gradients.  A batch norm or activation module with hooks stays
unfused; the model's own hooks and those of modules holding batch norms are carried over.  Models are
tiny: on CPU the fused layers run interpreted.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from fuse_helpers import MODES, assert_same_computation, double_output, fused_layers, make, saved
from torch import nn

import tritonbn
from tritonbn.conversion.fused_sequential import FusedSequential


def double_output_with_kwargs(module, args, kwargs, output):
    return output * 2


def shift_input(module, args):
    return (args[0] + 0.5,)


def shift_input_with_kwargs(module, args, kwargs):
    return (args[0] + 0.5,), kwargs


def double_grad_input(module, grad_input, grad_output):
    return tuple(None if grad is None else grad * 2 for grad in grad_input)


def double_grad_output(module, grad_output):
    return tuple(grad * 2 for grad in grad_output)


# Each kind of hook nn.Module.__call__ runs, and the words the report uses for it.
HOOKS = {
    "forward": (lambda m: m.register_forward_hook(double_output), "forward hook"),
    "forward_kwargs_always": (
        lambda m: m.register_forward_hook(double_output_with_kwargs, with_kwargs=True, always_call=True),
        "forward hook"),
    "forward_pre": (lambda m: m.register_forward_pre_hook(shift_input), "forward pre-hook"),
    "forward_pre_kwargs": (
        lambda m: m.register_forward_pre_hook(shift_input_with_kwargs, with_kwargs=True), "forward pre-hook"),
    "full_backward": (lambda m: m.register_full_backward_hook(double_grad_input), "backward hook"),
    "backward_pre": (lambda m: m.register_full_backward_pre_hook(double_grad_output), "backward pre-hook"),
}


def hooked(model, path, kind):
    """``model`` with a hook of ``kind`` on its submodule at ``path``."""
    HOOKS[kind][0](model.get_submodule(path))
    return model


class Block(nn.Module):
    """conv - bn1 - relu, then bn2 + skip - act: a pair and a triple with a residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(3)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn2(self.relu(self.bn1(self.conv(x)))) + x)


BLOCK_FUSED = {"bn1": ("relu", 0.01, False), "bn2": ("silu", 0.01, True)}
SHAPE = (2, 3, 3, 3)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("kind", HOOKS)
def test_hook_on_a_batch_norm_leaves_it_unfused(kind, training):
    model = hooked(make(Block), "bn1", kind)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert fused_layers(fused) == {"bn2": BLOCK_FUSED["bn2"]}
    assert report.unfused == {"bn1": f"{HOOKS[kind][1]} on bn1, which a fused call would bypass"}
    assert type(fused.bn1) is nn.BatchNorm2d
    assert_same_computation(model, fused, SHAPE, training)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "backward_pre"])
def test_hook_on_an_activation_module(kind, training):
    # A hook on relu keeps bn1 unfused; one on act (after the add) leaves bn2 fused with the add alone.
    model = hooked(hooked(make(Block), "relu", kind), "act", kind)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert fused_layers(fused) == {"bn2": ("identity", 0.01, True)}
    assert report.unfused == {"bn1": f"{HOOKS[kind][1]} on relu, which a fused call would bypass"}
    assert_same_computation(model, fused, SHAPE, training)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("kind", HOOKS)
def test_hooks_on_the_model_run_in_the_fused_model(kind, training):
    model = hooked(make(Block), "", kind)
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == BLOCK_FUSED
    assert_same_computation(model, fused, SHAPE, training)


class Outer(nn.Module):
    """A Block inside a model, and a batch norm after it."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(self.block(x)))


def record_into(features):
    def record(module, args, output):
        features.append(output.detach().clone())

    return record


@pytest.mark.parametrize("training", MODES)
def test_module_with_hooks_is_fused_on_its_own(training):
    features = {"original": [], "fused": []}
    model = hooked(make(Outer), "block", "forward")
    model.block.register_forward_hook(record_into(features["original"]))
    fused = tritonbn.fuse(model)
    fused.block._forward_hooks.popitem()  # record into the fused model's own list
    fused.block.register_forward_hook(record_into(features["fused"]))
    assert fused_layers(fused) == {"bn": ("relu", 0.01, False), "block.bn1": BLOCK_FUSED["bn1"],
                                   "block.bn2": BLOCK_FUSED["bn2"]}
    assert isinstance(fused.block, torch.fx.GraphModule) and len(fused.block._forward_hooks) == 2
    assert_same_computation(model, fused, SHAPE, training)
    assert len(features["fused"]) == len(features["original"]) == 2
    for recorded, expected in zip(features["fused"], features["original"]):
        torch.testing.assert_close(recorded, expected)


@pytest.mark.parametrize("kind", ["full_backward", "backward_pre"])
def test_backward_hooks_on_a_module_fused_on_its_own(kind):
    model = hooked(make(Outer), "block", kind)
    fused = tritonbn.fuse(model)
    assert sorted(fused_layers(fused)) == ["block.bn1", "block.bn2", "bn"]
    assert_same_computation(model, fused, SHAPE, True)


class NonDefault(nn.Module):
    """Calls a module with hooks with another value than its forward's default."""

    def __init__(self):
        super().__init__()
        self.scaled = Scaled()
        self.plain = Scaled()

    def forward(self, x):
        return self.plain(self.scaled(x, 2.0))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, scale=1.0):
        return F.relu(self.bn(x)) * scale


class CallsInside(Outer):
    """Calls a batch norm inside the module with hooks directly, which must then stay a plain batch norm."""

    def forward(self, x):
        return self.bn(self.block(x)) + self.block.bn1(x)


class Untraceable(Block):
    def forward(self, x):
        y = super().forward(x)
        return y if y.mean() > 0 else -y


class HoldsUntraceable(Outer):
    def __init__(self):
        super().__init__()
        self.block = Untraceable()


@pytest.mark.parametrize(("model_class", "path", "why"), [
    (NonDefault, "scaled", "it is called with scale=2.0, while torch.fx traces its default 1.0"),
    (CallsInside, "block", "forward also uses modules inside it directly"),
    (HoldsUntraceable, "block", "torch.fx cannot trace it on its own: TraceError"),
])
def test_module_with_hooks_that_cannot_be_fused_on_its_own(model_class, path, why):
    model = hooked(make(model_class), path, "forward")
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "fx"
    inside = [name for name, m in model.named_modules() if name.startswith(f"{path}.") and type(m) is nn.BatchNorm2d]
    assert inside and not set(inside) & set(fused_layers(fused))
    for name in inside:
        assert report.unfused[name].startswith(f"inside {path}, kept whole to run its forward hook; {why}")
    assert fused.get_submodule(path) is not model.get_submodule(path)  # a copy, not fused
    assert type(fused.get_submodule(path)) is type(model.get_submodule(path))
    assert_same_computation(model, fused, SHAPE, True)


# torch warns that such a hook misses gradients when its module runs several operations; these do.
legacy_hook_warning = pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")


@legacy_hook_warning
def test_deprecated_backward_hook_keeps_its_module_unfused():
    model = make(Outer)
    model.block.register_backward_hook(double_grad_input)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert fused_layers(fused) == {"bn": ("relu", 0.01, False)}
    assert report.unfused["block.bn1"].startswith("block has a backward hook from register_backward_hook")
    assert_same_computation(model, fused, SHAPE, True)
    model = make(Outer)
    model.register_backward_hook(double_grad_input)
    fused = tritonbn.fuse(model)
    assert fused.tritonbn_fuse_report.fused == [] and len(fused.tritonbn_fuse_report.unfused) == 3
    assert_same_computation(model, fused, SHAPE, True)


def test_hook_handles_still_remove_hooks_with_inplace():
    model = make(Outer)
    handles = [model.register_forward_hook(double_output), model.block.register_forward_pre_hook(shift_input)]
    reference = copy.deepcopy(model)
    fused = tritonbn.fuse(model, inplace=True)
    assert len(fused.tritonbn_fuse_report.fused) == 3
    for handle in handles:
        handle.remove()
    reference._forward_hooks.clear()
    reference.block._forward_pre_hooks.clear()
    assert_same_computation(reference, fused, SHAPE, False)


def test_hooks_survive_copies_and_unfuse():
    model = hooked(hooked(hooked(make(Outer), "", "forward_pre"), "block", "forward"), "block.relu", "forward")
    fused = tritonbn.fuse(model)
    assert fused_layers(fused) == {"bn": ("relu", 0.01, False), "block.bn2": BLOCK_FUSED["bn2"]}
    copies = [copy.deepcopy(fused), copy.copy(fused), torch.load(saved(fused), weights_only=False)]
    for copied in copies:
        assert_same_computation(model, copied, SHAPE, False)
    plain = tritonbn.unfuse(fused)
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules()), plain
    assert_same_computation(model, plain, SHAPE, True)
    plain.load_state_dict(model.state_dict(), strict=True)
    make(Outer).load_state_dict(plain.state_dict(), strict=True)


class UntraceableSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.SiLU(),
                                      nn.BatchNorm2d(3), nn.ReLU6())

    def forward(self, x):
        y = self.features(x)
        return y if y.mean() > 0 else -y


@legacy_hook_warning
@pytest.mark.parametrize("training", MODES)
def test_hooks_in_the_sequential_fallback(training):
    model = make(UntraceableSequential)
    for path, kind in [("features.0", "forward"), ("features.3", "backward_pre"), ("features", "forward_pre")]:
        hooked(model, path, kind)
    fused = tritonbn.fuse(model)
    report = fused.tritonbn_fuse_report
    assert report.method == "sequential" and type(fused.features) is FusedSequential
    assert len(fused.features._forward_pre_hooks) == 1  # the container keeps its own hooks
    assert fused_layers(fused) == {"features.4": ("relu6", 0.01, False)}
    assert report.unfused == {"features.0": "forward hook on features.0, which a fused call would bypass",
                              "features.2": "backward pre-hook on features.3, which a fused call would bypass"}
    assert_same_computation(model, fused, SHAPE, training)
    model.register_backward_hook(double_grad_input)
    fused = tritonbn.fuse(model)
    assert fused.tritonbn_fuse_report.fused == [] and type(fused.features) is nn.Sequential
    assert_same_computation(model, fused, SHAPE, training)
