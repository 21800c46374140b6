"""Fuzzing against float64 PyTorch: seeded random cases, each a whole call checked output, running statistics and
every gradient.

A case draws a shape (2-D to 5-D, odd and prime sizes, N * spatial from 2 up), a dtype, the layouts of x, the
residual and dy independently (contiguous, channels_last, spatial dims transposed, channels sliced out of a wider
buffer, a storage offset, dims reversed, expanded), weight, bias and running statistics dense, strided or offset
(the memory between their elements NaN, which must stay NaN and must not leak into a result), an activation,
train or eval, momentum 0, 0.1, 1 or None, through the functional API or the module (its num_batches_tracked
already counting, momentum=None always through it), and
half the time a forced configuration of small tiles and many splits for one of the variants; one case in ten puts
a NaN or an inf into x and checks that the forward and the statistics carry it as PyTorch's do.

Each case's test id is its index and its draw comes from the test's seed, which the suite prints (replay with
TRITONBN_TEST_SEED=<seed> -k <id>); a failure names the case. TRITONBN_FUZZ_CASES sets the number of cases
(default 64, sized to the suite's time budget under the interpreter).
"""

import contextlib
import dataclasses
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from _helpers import ACTIVATION_KINKS, KINK_MARGIN, TOLERANCE, TORCH_ACTIVATIONS
from torch import nn

import tritonbn
from tritonbn.kernels import configs

CASES = int(os.environ.get("TRITONBN_FUZZ_CASES", "64"))
ACTIVATIONS = tuple(TORCH_ACTIVATIONS)
LAYOUTS = ("contiguous", "channels_last", "spatial_transposed", "channel_slice", "storage_offset", "reversed",
           "expanded")
VECTOR_LAYOUTS = ("dense", "strided", "offset")
MODULES = {2: tritonbn.BatchNormAct1d, 3: tritonbn.BatchNormAct1d, 4: tritonbn.BatchNormAct2d,
           5: tritonbn.BatchNormAct3d}


@dataclasses.dataclass
class Case:
    shape: tuple
    dtype: torch.dtype
    param_dtype: torch.dtype
    layouts: dict  # x, residual (or None: no residual), dy
    vectors: dict  # weight, bias (None: absent), running (None: no running statistics)
    activation: str
    training: bool
    momentum: float | None  # None: momentum=None (through the module)
    module: bool  # through BatchNormActNd, whose num_batches_tracked counts from `batches`; else the functional API
    batches: int
    config: configs.KernelConfig | None
    poison: float | None  # a NaN or inf put into x (forward and statistics checked only)
    grads: tuple  # which of weight, bias, residual ask for a gradient (x always does)

    def __str__(self):
        fields = dataclasses.asdict(self) | {"config": self.config}
        return ", ".join(f"{name}={value}" for name, value in fields.items())


def draw_case(rng: random.Random) -> Case:
    ndim = rng.choice((2, 3, 4, 4, 5))
    while True:
        shape = (rng.choice((1, 2, 3, 5)), rng.choice((1, 2, 3, 5, 7, 11)),
                 *(rng.choice((1, 2, 3, 5, 7)) for _ in range(ndim - 2)))
        rows = shape[0] * math.prod(shape[2:])
        if 2 <= rows and math.prod(shape) <= 700:
            break
    dtype = rng.choice((torch.float32, torch.float64, torch.float16, torch.bfloat16))
    param_dtype = rng.choice((dtype, torch.float32)) if dtype in (torch.float16, torch.bfloat16) else dtype
    training = rng.random() < 0.7
    momentum = rng.choice((0.0, 0.1, 1.0, None))
    layouts = {name: rng.choice(LAYOUTS[:-1] if name == "x" else LAYOUTS) for name in ("x", "residual", "dy")}
    if rng.random() < 0.5:
        layouts["residual"] = None
    vectors = {"weight": rng.choice((None,) + VECTOR_LAYOUTS), "bias": rng.choice((None,) + VECTOR_LAYOUTS),
               "running": rng.choice(VECTOR_LAYOUTS + ((None,) if training and momentum is not None else ()))}
    config = None
    if rng.random() < 0.5:
        block_r = rng.choice((1, 2, 4, 8, 16, 32))
        config = configs.KernelConfig(rng.choice(configs.VARIANTS), block_r, rng.choice((1, 2, 4, 8)),
                                      rng.choice([s for s in (1, 2, 4) if s <= block_r]),
                                      addressing=rng.choice(("native", "native", "strided")))
    poison = rng.choice((float("nan"), float("inf"), -float("inf"))) if rng.random() < 0.1 else None
    activation = rng.choice(ACTIVATIONS)
    if poison is not None and activation == "gelu":
        activation = "silu"  # PyTorch's own float32 CPU gelu(inf) is NaN, its float64 one inf: not a fair reference
    grads = tuple(rng.random() < 0.7 for _ in range(3))
    module = momentum is None or (vectors["running"] is not None and rng.random() < 0.3)
    return Case(shape, dtype, param_dtype, layouts, vectors, activation, training, momentum, module,
                rng.randrange(4), config, poison, grads)


def lay_out(values: torch.Tensor, layout: str, dtype: torch.dtype, rng: random.Random,
            zeros: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor of ``dtype`` holding ``values`` (float64) in ``layout``; an expanded one keeps only the values
    along the expanded dim's first index, and is 0 along it wherever ``zeros`` (a mask of ``values``'s shape) holds
    anywhere along it: the values that ``zeros`` marks must stay 0. Memory a view skips over is NaN."""
    shape, ndim = values.shape, values.dim()
    values = values.to(dtype)
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last" and ndim in (4, 5):
        return values.contiguous(memory_format=torch.channels_last if ndim == 4 else torch.channels_last_3d)
    if layout == "spatial_transposed" and ndim >= 4:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channel_slice":
        step = rng.choice((2, 3))
        buffer = torch.full((shape[0], step * shape[1] + 1, *shape[2:]), float("nan"), dtype=dtype)
        view = buffer[:, 1::step]
        view.copy_(values)
        return view
    if layout == "storage_offset":
        offset = rng.randrange(1, 9)
        buffer = torch.full((values.numel() + offset + 3,), float("nan"), dtype=dtype)
        view = buffer[offset:offset + values.numel()].view(shape)
        view.copy_(values)
        return view
    if layout == "reversed":
        order = list(reversed(range(ndim)))
        return values.permute(order).contiguous().permute(order)
    if layout == "expanded":
        dims = [d for d in (0, *range(2, ndim)) if shape[d] > 1] or [0]
        dim = dims[rng.randrange(len(dims))]
        kept = values.narrow(dim, 0, 1)
        if zeros is not None:
            kept = kept.masked_fill(zeros.any(dim, keepdim=True), 0.0)
        return kept.expand(shape)
    return values.contiguous()  # a layout this rank does not have (channels_last of a 3-D tensor)


def vector(values: torch.Tensor, layout: str, dtype: torch.dtype, rng: random.Random):
    """(per-channel tensor of ``dtype`` in ``layout``, the NaN buffer around it or None)."""
    values = values.to(dtype)
    if layout == "dense":
        return values.clone(), None
    C = values.numel()
    step, offset = (rng.choice((2, 3)), 0) if layout == "strided" else (1, rng.randrange(1, 5))
    buffer = torch.full((offset + step * C + 2,), float("nan"), dtype=dtype)
    view = buffer[offset:offset + step * C:step]
    view.copy_(values)
    return view, buffer


def _gaps_untouched(buffer, view):
    """Whether every element of ``buffer`` outside ``view`` is still NaN."""
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[view.storage_offset():view.storage_offset() + view.stride(0) * view.numel():view.stride(0)] = False
    return bool(buffer[outside].isnan().all())


def _rms(t):
    return t.square().mean().sqrt().item() if t.numel() else 0.0


def _near_kinks(z, activation):
    near = torch.zeros(z.shape, dtype=torch.bool)
    for kink in ACTIVATION_KINKS.get(activation, ()):
        near |= (z - kink).abs() < KINK_MARGIN
    return near


def _close(actual, expected, tol, what, scale=0.0):
    """As assert_close_to_reference, with NaN and inf required where PyTorch has them; ``scale`` (the size of the
    terms a result cancels from: the input gradient of a channel with two values is roundoff) floors the
    absolute tolerance at tol * scale."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = expected.isfinite()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN where PyTorch has none, or not where it has"
    assert torch.equal(actual[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()]), f"{what}: inf"
    actual, expected = actual[finite], expected[finite]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(_rms(expected), scale),
                               msg=lambda m: f"{what}: {m}")


def run_case(case: Case, rng: random.Random, device: str):
    N, C = case.shape[:2]
    torch_rng = torch.Generator().manual_seed(rng.randrange(2**31))

    def normal(*shape):
        return torch.randn(*shape, generator=torch_rng, dtype=torch.float64)

    means, spreads = normal(C) * 2, torch.rand(C, generator=torch_rng, dtype=torch.float64) * 2 + 0.5
    view = (1, C) + (1,) * (len(case.shape) - 2)
    x_values = normal(*case.shape) * spreads.view(view) + means.view(view)
    if case.poison is not None:
        x_values.view(N, C, -1)[rng.randrange(N), rng.randrange(C), 0] = case.poison
    x = lay_out(x_values, case.layouts["x"], case.dtype, rng)
    residual = None
    if case.layouts["residual"] is not None:
        residual = lay_out(normal(*case.shape), case.layouts["residual"], case.dtype, rng)
    buffers = {}
    weight = bias = running_mean = running_var = None
    if case.vectors["weight"] is not None:
        signs = torch.where(torch.rand(C, generator=torch_rng) < 0.25, -1.0, 1.0).double()
        weight, buffers["weight"] = vector(signs * (torch.rand(C, generator=torch_rng).double() * 2.5 + 0.5),
                                           case.vectors["weight"], case.param_dtype, rng)
    if case.vectors["bias"] is not None:
        bias, buffers["bias"] = vector(normal(C), case.vectors["bias"], case.param_dtype, rng)
    if case.vectors["running"] is not None:
        running_mean, buffers["running_mean"] = vector(means + 0.3 * normal(C), case.vectors["running"],
                                                       case.param_dtype, rng)
        running_var, buffers["running_var"] = vector(spreads**2 * (torch.rand(C, generator=torch_rng).double() + 0.5),
                                                     case.vectors["running"], case.param_dtype, rng)
    on = {name: t.to(device) if t is not None else None for name, t in
          (("x", x), ("residual", residual), ("weight", weight), ("bias", bias), ("running_mean", running_mean),
           ("running_var", running_var))}
    if device != "cpu":  # strided views of the CPU buffers are rebuilt on the device as dense copies
        buffers = {}

    leaves = {"input": on["x"].detach().requires_grad_()}
    for name, wants in zip(("weight", "bias", "residual"), case.grads):
        if on[name] is not None:  # a module's weight and bias are parameters (of the same strides)
            leaf = on[name].detach()
            leaves[name] = nn.Parameter(leaf, wants) if case.module and name != "residual" else \
                leaf.requires_grad_(wants)
    # Dense float64 copies: PyTorch's CPU batch norm backward reads a strided weight as if it were dense (NaN
    # from the gaps here, in torch 2.13), and a float64 running statistic must not be updated twice.
    reference_leaves = {name: t.detach().cpu().double().clone(memory_format=torch.contiguous_format)
                        .requires_grad_(t.requires_grad) for name, t in leaves.items()}
    reference_running = [None if t is None else t.cpu().double().clone(memory_format=torch.contiguous_format)
                         for t in (running_mean, running_var)]

    if case.module:
        factor = 1.0 / (case.batches + 1) if case.momentum is None else case.momentum
        module = MODULES[len(case.shape)](C, momentum=case.momentum, affine=False, activation=case.activation,
                                          negative_slope=0.2).to(device)
        module.weight, module.bias = leaves.get("weight"), leaves.get("bias")
        module.running_mean, module.running_var = on["running_mean"], on["running_var"]
        module.num_batches_tracked.fill_(case.batches)
        module.train(case.training)
        y = module(leaves["input"], leaves.get("residual"))
    else:
        factor = case.momentum
        y = tritonbn.batch_norm_act(leaves["input"], on["running_mean"], on["running_var"], leaves.get("weight"),
                                    leaves.get("bias"), case.training, case.momentum, 1e-5, activation=case.activation,
                                    negative_slope=0.2, residual=leaves.get("residual"))
    z_ref = F.batch_norm(reference_leaves["input"], *reference_running, reference_leaves.get("weight"),
                         reference_leaves.get("bias"), case.training, factor, 1e-5)
    if "residual" in reference_leaves:
        z_ref = z_ref + reference_leaves["residual"]
    z_ref.retain_grad()
    y_ref = TORCH_ACTIVATIONS[case.activation](z_ref, 0.2)

    tol = TOLERANCE[case.dtype]
    _close(y, y_ref, tol, "output")
    if running_mean is not None:
        for name, got, want in zip(("running_mean", "running_var"), (on["running_mean"], on["running_var"]),
                                   reference_running):
            _close(got, want, max(tol, TOLERANCE[case.param_dtype]), name)
    for name, buffer in buffers.items():
        if buffer is not None:
                assert _gaps_untouched(buffer, {"weight": weight, "bias": bias, "running_mean": running_mean,
                                            "running_var": running_var}[name]), f"memory around {name} was written"
    if case.module:
        assert int(module.num_batches_tracked) == case.batches + case.training, "num_batches_tracked"
    if case.poison is not None:
        return  # gradients through a NaN are PyTorch's own business

    # No upstream gradient where z lies at a kink (which side rounding puts it on is not the kernels' to match).
    near_kinks = _near_kinks(z_ref.detach(), case.activation)
    dy_values = normal(*case.shape).masked_fill(near_kinks, 0.0)
    dy = lay_out(dy_values, case.layouts["dy"], y.dtype, rng, zeros=near_kinks).to(device)
    wanted = [name for name, leaf in leaves.items() if leaf.requires_grad]
    grads = torch.autograd.grad(y, [leaves[name] for name in wanted], dy)
    # dy dense for PyTorch too: its CPU batch norm backward misreads some strides (a (1, 5, 7, 1) dy of strides
    # (1, 1, 5, 35) beside a contiguous x gives a wrong input gradient in torch 2.13).
    reference_grads = torch.autograd.grad(y_ref, [reference_leaves[name] for name in wanted] + [z_ref],
                                          dy.double().cpu().contiguous())
    # The terms each gradient adds up, whose size bounds its roundoff where they cancel (a dy constant along a
    # channel makes the weight gradient a sum of terms that cancel to 0): dz * weight * rstd for the input,
    # dz * xhat and dz summed over a channel's rows for the weight and the bias.
    x64, dz = reference_leaves["input"].detach(), reference_grads[-1]
    dims = [0, *range(2, x64.dim())]
    mean, var = (x64.mean(dims), x64.var(dims, correction=0)) if case.training else reference_running
    rstd = (var + 1e-5).rsqrt()
    xhat = (x64 - mean.view(view)) * rstd.view(view)
    gain = (1.0 if weight is None else weight.double().abs()) * rstd
    scales = {"input": _rms(dz * gain.view(view)), "weight": _rms((dz * xhat).abs().sum(dims)),
              "bias": _rms(dz.abs().sum(dims)), "residual": 0.0}
    for name, grad, expected in zip(wanted, grads, reference_grads):
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape, f"grad of {name}"
        scale = scales[name]
        _close(grad, expected, max(tol, TOLERANCE[leaves[name].dtype]), f"grad of {name}", scale)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("index", range(CASES), ids=lambda i: f"case-{i}")
def test_fuzz_case_against_float64(device, fresh_seed, index):
    rng = random.Random(fresh_seed)
    case = draw_case(rng)
    print(f"case {index}: {case}")
    tritonbn.plans.clear()  # a forced configuration must plan anew, and leave no plan behind
    try:
        with configs.override(case.config) if case.config is not None else contextlib.nullcontext():
            run_case(case, rng, device)
    except AssertionError as error:
        raise AssertionError(f"{error}\n  seed {fresh_seed}, case {index}: {case}") from None
    finally:
        tritonbn.plans.clear()
