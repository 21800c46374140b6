"""Reference implementation and input factories shared by the tests.

The reference is PyTorch's own F.batch_norm, then `+ residual`, then the torch activation, all in float64
on the same (already rounded) input values the library sees, so the only differences left are the
library's own rounding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import tritonbn

# Allowed error, relative to each element and to the root-mean-square of the expected tensor (see
# assert_close_to_reference). The library computes in float32 (float64 for float64 input) and rounds
# once to the output dtype, so the budget is a few roundings of that dtype: float16 rounds at ~5e-4 and
# bfloat16 at ~4e-3, float32 accumulations over a few thousand values lose ~1e-6.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

TORCH_ACTIVATIONS = {
    "identity": lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": lambda z, slope: F.leaky_relu(z, slope),
    "relu6": lambda z, slope: F.relu6(z),
    "elu": lambda z, slope: F.elu(z, alpha=1.0),
    "silu": lambda z, slope: F.silu(z),
    "gelu": lambda z, slope: F.gelu(z, approximate="none"),
    # PyTorch's CUDA hardswish multiplies by 1/6 rounded to float32 even for float64 input (3e-8 relative
    # off); its CPU kernel divides in the input's precision, so the reference runs there on every device.
    "hardswish": lambda z, slope: F.hardswish(z.cpu()).to(z.device),
}

# Pre-activation values where the activation's derivative jumps. Which side a value lying right on
# such a point falls on depends on rounding, so the tests give those elements no upstream gradient.
ACTIVATION_KINKS = {
    "relu": (0.0,),
    "leaky_relu": (0.0,),
    "relu6": (0.0, 6.0),
    "hardswish": (-3.0, 3.0),
}
KINK_MARGIN = 1e-2


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def torch_activation_module(name, negative_slope):
    """The nn module PyTorch users would put after nn.BatchNorm for `name`."""
    modules = {
        "identity": lambda: nn.Identity(),
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope),
        "relu6": lambda: nn.ReLU6(),
        "elu": lambda: nn.ELU(alpha=1.0),
        "silu": lambda: nn.SiLU(),
        "gelu": lambda: nn.GELU(approximate="none"),
        "hardswish": lambda: nn.Hardswish(),
    }
    return modules[name]()


def reference_batch_norm_act(
    x, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope, residual
):
    """float64 reference: returns (output, pre-activation). Updates the given running stats in place."""
    z = F.batch_norm(
        x.double(),
        running_mean,
        running_var,
        None if weight is None else weight.double(),
        None if bias is None else bias.double(),
        training,
        momentum,
        eps,
    )
    if residual is not None:
        z = z + residual.double()
    return TORCH_ACTIVATIONS[activation](z, negative_slope), z


def assert_close_to_reference(actual, expected, tol, what):
    """|actual - expected| <= tol * (|expected| + rms(expected)), elementwise.

    The rms term lets values that cancel to near zero (common in the input gradient) carry the error of
    the terms they were computed from.
    """
    expected = expected.detach().double()
    rms = expected.pow(2).mean().sqrt().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.cpu(),
        atol=tol * rms,
        rtol=tol,
        msg=lambda m: f"{what}: {m}",
    )


def channel_view(values, ndim):
    """Reshape a per-channel vector so it broadcasts against an (N, C, *spatial) tensor."""
    return values.view([1, -1] + [1] * (ndim - 2))


@dataclass
class BatchNormCase:
    x: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    residual: torch.Tensor | None


def random_input(shape, dtype, device, *, mean_scale=2.0):
    """Normal values with a different, non-trivial mean and spread in every channel."""
    num_channels = shape[1]
    mean = torch.randn(num_channels, dtype=torch.float64) * mean_scale
    spread = torch.rand(num_channels, dtype=torch.float64) * 2.5 + 0.5
    x = torch.randn(shape, dtype=torch.float64) * channel_view(spread, len(shape)) + channel_view(mean, len(shape))
    return x.to(device=device, dtype=dtype), mean, spread


def make_case(shape, dtype, device, *, param_dtype=None, affine=True, residual=False):
    """Random input, parameters and running stats (near the input's true stats, but not equal to them).

    Weights have random sign and magnitudes up to 3 so that pre-activations reach every region of every
    activation (relu6's upper clip, hardswish's flat parts).
    """
    param_dtype = param_dtype or dtype
    num_channels = shape[1]
    x, mean, spread = random_input(shape, dtype, device)

    def param(values):
        return values.to(device=device, dtype=param_dtype)

    running_mean = param(mean + 0.3 * spread * torch.randn(num_channels, dtype=torch.float64))
    running_var = param(spread**2 * (torch.rand(num_channels, dtype=torch.float64) * 1.5 + 0.5))
    weight = bias = None
    if affine:
        sign = torch.where(torch.rand(num_channels) < 0.25, -1.0, 1.0).double()
        weight = param(sign * (torch.rand(num_channels, dtype=torch.float64) * 2.5 + 0.5))
        bias = param(torch.randn(num_channels, dtype=torch.float64))
    res = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype) if residual else None
    return BatchNormCase(x, running_mean, running_var, weight, bias, res)


def arrange(x, arrangement):
    """The same values as x, stored in the named memory layout."""
    if arrangement == "contiguous":
        return x.contiguous()
    if arrangement == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if arrangement == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if arrangement == "sliced":
        # Every other channel of a wider buffer, and an inner window of the last dimension. The rest of
        # the buffer is NaN so that any read outside the view shows up in the result.
        n, c, *spatial = x.shape
        buffer = x.new_full((n, 2 * c, *spatial[:-1], spatial[-1] + 3), float("nan"))
        view = buffer[:, ::2, ..., 1 : spatial[-1] + 1]
        view.copy_(x)
        return view
    if arrangement == "reversed_dims":
        # Dimensions stored in reverse order: neither contiguous nor channels_last.
        order = list(reversed(range(x.dim())))
        return x.permute(order).contiguous().permute(order)
    if arrangement == "channels_innermost":
        # (N, C, L) stored as (N, L, C), as a transposed sequence batch would be.
        return x.transpose(1, -1).contiguous().transpose(1, -1)
    raise ValueError(f"unknown arrangement {arrangement!r}")


def memory_format_of(arrangement):
    """The memory format the output must keep, or None where the layout has no named format."""
    return {
        "contiguous": torch.contiguous_format,
        "channels_last": torch.channels_last,
        "channels_last_3d": torch.channels_last_3d,
    }.get(arrangement)


def upstream_grad(y, z_reference, activation):
    """Random gradient of the output, zero where the pre-activation sits on a kink of the activation."""
    dy = torch.randn_like(y)
    near_kink = torch.zeros(z_reference.shape, dtype=torch.bool)
    for kink in ACTIVATION_KINKS.get(activation, ()):
        near_kink |= (z_reference.detach().cpu() - kink).abs() < KINK_MARGIN
    return dy.masked_fill(near_kink.to(dy.device), 0.0)


def check_batch_norm_act(case, *, training, activation, negative_slope=0.2, momentum=0.2, eps=1e-5, memory_format=None):
    """Run tritonbn.batch_norm_act on `case` and compare output, running stats and every gradient with
    the float64 reference. Returns the output so callers can check more."""
    inputs = {"input": case.x, "weight": case.weight, "bias": case.bias, "residual": case.residual}
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items() if t is not None}
    ref_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    stats_before = (case.running_mean.clone(), case.running_var.clone())
    ref_mean, ref_var = (s.double() for s in stats_before)

    y = tritonbn.batch_norm_act(
        leaves["input"],
        case.running_mean,
        case.running_var,
        leaves.get("weight"),
        leaves.get("bias"),
        training,
        momentum,
        eps,
        activation=activation,
        negative_slope=negative_slope,
        residual=leaves.get("residual"),
    )
    y_ref, z_ref = reference_batch_norm_act(
        ref_leaves["input"],
        ref_mean,
        ref_var,
        ref_leaves.get("weight"),
        ref_leaves.get("bias"),
        training,
        momentum,
        eps,
        activation,
        negative_slope,
        ref_leaves.get("residual"),
    )

    tol = TOLERANCE[case.x.dtype]
    assert y.shape == case.x.shape and y.dtype == case.x.dtype and y.device == case.x.device
    if memory_format is not None:
        assert y.is_contiguous(memory_format=memory_format), f"output lost {memory_format}: {y.stride()}"
    assert_close_to_reference(y, y_ref, tol, "output")

    stats_tol = TOLERANCE[case.running_mean.dtype]
    if training:
        assert_close_to_reference(case.running_mean, ref_mean, stats_tol, "running_mean")
        assert_close_to_reference(case.running_var, ref_var, stats_tol, "running_var")
    else:
        assert torch.equal(case.running_mean, stats_before[0]) and torch.equal(case.running_var, stats_before[1])

    dy = upstream_grad(y, z_ref, activation)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    ref_grads = torch.autograd.grad(y_ref, list(ref_leaves.values()), dy.double())
    for (name, leaf), grad, ref_grad in zip(leaves.items(), grads, ref_grads, strict=True):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, f"grad of {name}: {grad.dtype} {grad.shape}"
        grad_tol = max(TOLERANCE[leaf.dtype], tol)
        assert_close_to_reference(grad, ref_grad, grad_tol, f"grad of {name}")
    return y


class GraphRecorder:
    """A torch.compile backend that keeps the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def targets(self) -> list[str]:
        """Every op called, as often as called, those that mutate included (functionalization wraps them, op
        first)."""
        nodes = [node for graph in self.graphs for node in graph.graph.nodes]
        return [str(node.target) for node in nodes] + [
            str(node.args[0]) for node in nodes if str(node.target).startswith("auto_functionalized")]
