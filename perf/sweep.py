"""The sweep: every (shape, dtype, layout, activation, residual, mode) on every backend.

For each configuration the same inputs go to every backend. A backend's outputs (y, the updated running
stats, the gradients) are first checked against eager's (`ok`, `max_err`), then the call is timed, its peak
memory taken (CUDA only) and the bytes it saves for backward summed.
"""

import itertools
import math
from dataclasses import dataclass

import torch

from . import bandwidth, results
from .backends import Backend, eager_batch_norm_act
from .shapes import ShapeCase
from .timing import measure, timing_label

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
LAYOUTS = ("nchw", "nhwc")
# Largest |output - eager| allowed, relative to max |eager output|: the checks catch wrong results, not
# reduction-order noise, so each bound sits well above one rounding step of its dtype.
TOLERANCE = {"fp64": 1e-9, "fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}
# The reference every backend is checked against, whether or not eager is among the timed backends.
EAGER = Backend("eager", eager_batch_norm_act)


@dataclass(frozen=True)
class Config:
    preset: str
    case: ShapeCase
    dtype: str
    layout: str
    activation: str
    residual: bool
    mode: str


def configs(cases, dtypes, layouts, activations, residuals, modes) -> list[Config]:
    """The cross product, without channels_last variants of 2-D and 3-D shapes, where layout means nothing."""
    out = []
    for (preset, case), dtype, layout, activation, residual, mode in itertools.product(
            cases, dtypes, layouts, activations, residuals, modes):
        if layout == "nhwc" and len(case.shape) < 4:
            continue
        out.append(Config(preset, case, dtype, layout, activation, residual, mode))
    return out


def memory_format(layout: str, ndim: int) -> torch.memory_format:
    if layout == "nhwc" and ndim == 4:
        return torch.channels_last
    if layout == "nhwc" and ndim == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def make_inputs(cfg: Config, device: torch.device) -> dict:
    """Random inputs with a non-zero mean and spread per channel, so a wrong statistic shows in the output.

    Half-precision inputs get fp32 parameters and statistics, as under autocast.
    """
    dtype = DTYPES[cfg.dtype]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    shape, channels = cfg.case.shape, cfg.case.channels
    fmt = memory_format(cfg.layout, len(shape))

    def activation_tensor():
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)

    view = (1, channels) + (1,) * (len(shape) - 2)
    x = (torch.randn(shape, device=device) * torch.rand(view, device=device).add(0.5) * 2
         + torch.randn(view, device=device)).to(dtype).contiguous(memory_format=fmt)
    return {
        "x": x,
        "weight": torch.rand(channels, device=device, dtype=param_dtype) + 0.5,
        "bias": torch.randn(channels, device=device, dtype=param_dtype),
        "running_mean": torch.randn(channels, device=device, dtype=param_dtype) * 0.1,
        "running_var": torch.rand(channels, device=device, dtype=param_dtype) + 0.5,
        "residual": activation_tensor() if cfg.residual else None,
        "dy": activation_tensor(),
    }


class Call:
    """One backend on one configuration: a step to run repeatedly, and the outputs of a single run."""

    def __init__(self, backend: Backend, cfg: Config, inputs: dict):
        self.fn, self.cfg = backend.fn, cfg
        self.running_mean = inputs["running_mean"].clone()
        self.running_var = inputs["running_var"].clone()
        grad = cfg.mode != "eval"
        self.x = inputs["x"].detach().requires_grad_(grad)
        self.weight = inputs["weight"].detach().requires_grad_(grad)
        self.bias = inputs["bias"].detach().requires_grad_(grad)
        residual = inputs["residual"]
        self.residual = residual.detach().requires_grad_(grad) if residual is not None else None
        self.dy = inputs["dy"]
        self.leaves = [t for t in (self.x, self.weight, self.bias, self.residual) if t is not None]
        self.y = None

    def forward(self):
        return self.fn(self.x, self.running_mean, self.running_var, self.weight, self.bias,
                       training=self.cfg.mode != "eval", activation=self.cfg.activation, residual=self.residual)

    def prepare(self):
        """Build the graph that `bwd` differentiates again and again (retain_graph keeps it alive)."""
        if self.cfg.mode == "bwd":
            self.y = self.forward()

    def step(self):
        mode = self.cfg.mode
        if mode == "eval":
            with torch.no_grad():
                return self.forward()
        if mode == "fwd":
            return self.forward()
        if mode == "bwd":
            return torch.autograd.grad(self.y, self.leaves, self.dy, retain_graph=True)
        y = self.forward()
        return y, torch.autograd.grad(y, self.leaves, self.dy)

    def outputs(self) -> dict:
        """Everything a correct backend must reproduce, from one run on fresh running statistics."""
        mode = self.cfg.mode
        if mode in ("fwd", "eval"):
            y = self.step()
            out = {"y": y}
            if mode == "fwd":
                out.update(running_mean=self.running_mean, running_var=self.running_var)
            return out
        y = self.forward()
        grads = torch.autograd.grad(y, self.leaves, self.dy)
        names = ["dx", "dweight", "dbias", "dresidual"][: len(grads)]
        return {"y": y, **dict(zip(names, grads)), "running_mean": self.running_mean,
                "running_var": self.running_var}


def max_error(outputs: dict, reference: dict) -> float:
    """Worst error over all outputs, each relative to the size of eager's output."""
    worst = 0.0
    for name, ref in reference.items():
        got, ref = outputs[name].detach().double(), ref.detach().double()
        if got.shape != ref.shape:
            return math.inf
        scale = ref.abs().max().item() if ref.numel() else 1.0
        diff = (got - ref).abs().max().item() if ref.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-6))
    return worst


def saved_for_backward(call: Call) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves in one forward, and those beyond the inputs' own.

    The second number is what a backend adds to a network's memory: saving x, which the network keeps
    anyway, costs nothing extra; saving y or a mask does.
    """
    if call.cfg.mode == "eval":
        return 0, 0
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    inputs = {t.untyped_storage().data_ptr() for t in call.leaves + [call.running_mean, call.running_var]}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call.forward()
    total = sum(storages.values())
    extra = sum(n for ptr, n in storages.items() if ptr not in inputs)
    return total, extra


def peak_memory(call: Call, device: torch.device) -> float:
    """Bytes allocated at the peak of one step beyond what was allocated before it (NaN off CUDA)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = call.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return float(peak)


def measure_backend(backend: Backend, cfg: Config, inputs: dict, reference: dict, device) -> dict:
    """The measured columns of one row; `status` says why a row holds no numbers."""
    dtype = DTYPES[cfg.dtype]
    reason = backend.unsupported(dtype, cfg.layout, len(cfg.case.shape), cfg.activation)
    if reason is not None:
        return {"status": f"skipped: {reason}", "ok": False}
    try:
        max_err = max_error(Call(backend, cfg, inputs).outputs(), reference)
        ok = max_err <= TOLERANCE[cfg.dtype]
        call = Call(backend, cfg, inputs)
        call.prepare()
        median, p20, p80 = measure(call.step, device)
        peak = peak_memory(call, device)
        saved, saved_extra = saved_for_backward(Call(backend, cfg, inputs))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "oom", "ok": False}
    except Exception as exc:  # one failing backend must not end a long sweep; the row records why
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return {"status": f"error: {message}", "ok": False}
    return {"status": "ok" if ok else "mismatch", "ok": ok, "max_err": max_err, "median_ms": median,
            "p20_ms": p20, "p80_ms": p80, "peak_mem_bytes": peak, "saved_bytes": saved,
            "saved_extra_bytes": saved_extra}


def describe(cfg: Config, backend: str, device: torch.device, copy_gbps: float) -> dict:
    """The configuration columns of a row, and the model's minimum bytes for it."""
    shape = cfg.case.shape
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    return {
        "preset": cfg.preset, "shape": cfg.case.label, "ndim": len(shape), "channels": cfg.case.channels,
        "reduced": cfg.case.reduced, "layers": cfg.case.layers, "dtype": cfg.dtype, "layout": cfg.layout,
        "activation": cfg.activation, "residual": cfg.residual, "mode": cfg.mode, "backend": backend,
        "timing": timing_label(device), "copy_gbps": copy_gbps,
        "min_bytes": bandwidth.min_bytes(cfg.mode, numel, itemsize, cfg.residual, cfg.activation),
        "max_err": math.nan, "median_ms": math.nan, "p20_ms": math.nan, "p80_ms": math.nan,
        "peak_mem_bytes": math.nan, "saved_bytes": math.nan, "saved_extra_bytes": math.nan,
    }


def derive(row: dict) -> None:
    if row["ok"]:
        row["gbps"] = bandwidth.effective_gbps(row["min_bytes"], row["median_ms"])
        row["pct_copy_bw"] = 100.0 * row["gbps"] / row["copy_gbps"]
    else:
        row["gbps"] = row["pct_copy_bw"] = math.nan


def run(cfgs: list[Config], backends: list[Backend], skipped: dict, device: torch.device, out: str,
        progress: bool = True, seed: int = 0) -> list[dict]:
    """Measure every configuration on every backend, write the merged CSV and return its rows."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    env = results.environment(device)
    copy_gbps = bandwidth.copy_bandwidth_gbps(device)
    rows = []
    bar = tqdm(total=len(cfgs) * (len(backends) + len(skipped)), disable=not progress, unit="row",
               desc="sweep")
    for cfg in cfgs:
        inputs = make_inputs(cfg, device)
        reference = Call(EAGER, cfg, inputs).outputs()
        for backend in backends:
            bar.set_postfix_str(f"{cfg.case.label} {cfg.dtype} {cfg.mode} {backend.name}", refresh=False)
            row = describe(cfg, backend.name, device, copy_gbps) | env
            row.update(measure_backend(backend, cfg, inputs, reference, device))
            derive(row)
            rows.append(row)
            bar.update()
        for name, reason in skipped.items():
            row = describe(cfg, name, device, copy_gbps) | env
            row.update(status=f"skipped: {reason}", ok=False)
            derive(row)
            rows.append(row)
            bar.update()
    bar.close()
    return results.write_rows(out, rows)
