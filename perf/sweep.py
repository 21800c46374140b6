"""The sweep: every (shape, dtype, layout, activation, residual, mode) on every backend.

For each configuration the same inputs go to every backend. A backend's outputs (y, the updated running
stats, the gradients) are first checked against a float64 reference of the same inputs (`checks`: `ok`,
`err_rel_l2`, `err_outliers`), then the call is timed end to end and split into device and host time
(`breakdown`), its peak memory taken (CUDA only) and the bytes it saves for backward summed.
"""

import contextlib
import itertools
import math
import time
from dataclasses import dataclass

import torch

from . import bandwidth, checks, results
from .backends import Backend, eager_batch_norm_act
from .breakdown import host_split_us, measure_call
from .constants import DTYPES
from .shapes import ShapeCase
from .timing import timing_label

TORCH_DTYPES = {name: getattr(torch, attribute) for name, attribute in DTYPES.items()}
# The reference every backend is checked against (in float64), whether or not eager is among the timed backends.
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
    dtype = TORCH_DTYPES[cfg.dtype]
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

    def backward(self, y):
        return torch.autograd.grad(y, self.leaves, self.dy)

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


def reference_outputs(cfg: Config, inputs: dict) -> dict:
    """Eager PyTorch's outputs in float64, from the inputs every backend gets (already rounded to cfg.dtype)."""
    wide = {name: None if t is None else t.detach().double() for name, t in inputs.items()}
    return Call(EAGER, cfg, wide).outputs()


def saved_for_backward(call: Call) -> tuple[int, int]:
    """Bytes of the distinct storages autograd keeps for backward after one forward, and those beyond the
    inputs' own: what it saves (seen by saved-tensor hooks) and what its nodes hold as attributes (a custom
    Function's ctx, which hooks do not see: tritonbn keeps its workspace so).

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
        y = call.forward()
    for held in held_by_nodes(y):
        pack(held)
    total = sum(storages.values())
    extra = sum(n for ptr, n in storages.items() if ptr not in inputs)
    return total, extra


def held_by_nodes(output: torch.Tensor) -> list:
    """The tensors the autograd nodes of ``output``'s graph hold as attributes (a custom Function's ctx)."""
    held, seen, nodes = [], set(), [output.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        held += [value for value in getattr(node, "__dict__", {}).values() if isinstance(value, torch.Tensor)]
        nodes += [next_node for next_node, _ in node.next_functions]
    return held


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


# The numeric columns `measure_backend` fills; NaN in rows it could not measure.
MEASURED = ("err_rel_l2", "err_outliers", "e2e_ms", "e2e_p20_ms", "e2e_p80_ms", "device_ms", "host_us", "host_fwd_us",
            "host_bwd_us", "launches",
            "peak_mem_bytes", "saved_bytes", "saved_extra_bytes")


def measure_backend(backend: Backend, cfg: Config, inputs: dict, reference: dict, device) -> dict:
    """The measured columns of one row; `status` says why a row holds no numbers."""
    dtype = TORCH_DTYPES[cfg.dtype]
    reason = backend.unsupported(dtype, cfg.layout, len(cfg.case.shape), cfg.activation)
    if reason is not None:
        return {"status": f"skipped: {reason}", "ok": False}
    try:
        verdict = checks.compare(Call(backend, cfg, inputs).outputs(), reference, cfg.dtype)
        call = Call(backend, cfg, inputs)
        call.prepare()
        split = measure_call(call.step, device)
        host_fwd = host_bwd = math.nan
        if cfg.mode == "fwd_bwd":  # the host's time split into the forward and its backward
            host_fwd, host_bwd = host_split_us(call.forward, call.backward, device)
        peak = peak_memory(call, device)
        saved, saved_extra = saved_for_backward(Call(backend, cfg, inputs))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "oom", "ok": False}
    except Exception as exc:  # one failing backend must not end a long sweep; the row records why
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return {"status": f"error: {message}", "ok": False}
    status = "ok" if verdict.ok else f"mismatch: {verdict.problem}"
    return {"status": status, "ok": verdict.ok, "err_rel_l2": verdict.rel_l2, "err_outliers": verdict.outliers,
            "e2e_ms": split.e2e_ms, "e2e_p20_ms": split.e2e_p20_ms, "e2e_p80_ms": split.e2e_p80_ms,
            "device_method": split.device_method, "device_ms": split.device_ms, "host_us": split.host_us,
            "host_fwd_us": host_fwd, "host_bwd_us": host_bwd,
            "launches": split.launches, "peak_mem_bytes": peak, "saved_bytes": saved,
            "saved_extra_bytes": saved_extra}


def describe(cfg: Config, backend: str, device: torch.device, copy_gbps: float) -> dict:
    """The configuration columns of a row, and the model's minimum bytes for it."""
    shape = cfg.case.shape
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=TORCH_DTYPES[cfg.dtype]).element_size()
    return {
        "preset": cfg.preset, "shape": cfg.case.label, "ndim": len(shape), "channels": cfg.case.channels,
        "reduced": cfg.case.reduced, "layers": cfg.case.layers, "dtype": cfg.dtype, "layout": cfg.layout,
        "activation": cfg.activation, "residual": cfg.residual, "mode": cfg.mode, "backend": backend,
        "timing": timing_label(device, tritonbn=backend == "tritonbn"), "copy_gbps": copy_gbps,
        "min_bytes": bandwidth.min_bytes(cfg.mode, numel, itemsize, cfg.residual, cfg.activation),
        "floor_bytes": bandwidth.floor_passes(cfg.mode, cfg.residual, cfg.activation) * numel * itemsize,
        "device_method": "", **dict.fromkeys(MEASURED, math.nan),
    }


def derive(row: dict) -> None:
    """Effective bandwidth (minimum bytes over time) from e2e and from device time, for valid rows, and the
    device time's share of copy bandwidth over the floor's bytes (100 = at the floor, at copy speed)."""
    for prefix, column in (("", "e2e_ms"), ("device_", "device_ms")):
        gbps = bandwidth.effective_gbps(row["min_bytes"], row[column]) if row["ok"] else math.nan
        row[f"{prefix}gbps"] = gbps
        row[f"{prefix}pct_copy_bw"] = 100.0 * gbps / row["copy_gbps"]
    floor_gbps = bandwidth.effective_gbps(row["floor_bytes"], row["device_ms"]) if row["ok"] else math.nan
    row["device_pct_floor"] = 100.0 * floor_gbps / row["copy_gbps"]


def run(cfgs: list[Config], backends: list[Backend], skipped: dict, device: torch.device, out: str,
        progress: bool = True, seed: int = 0, budget_s: float | None = None) -> list[dict]:
    """Measure every configuration on every backend (until ``budget_s`` seconds have passed: the rest are left
    out), write the merged CSV and return its rows."""
    from tqdm import tqdm

    started = time.perf_counter()
    torch.manual_seed(seed)
    env = results.environment(device)
    copy_gbps = bandwidth.copy_bandwidth_gbps(device)
    rows = []
    bar = tqdm(total=len(cfgs) * (len(backends) + len(skipped)), disable=not progress, unit="row",
               desc="sweep")
    # On CUDA every call runs on one side stream: graph capture refuses the default stream, and a backward
    # runs on its forward's stream (see breakdown._graph_replay_ms). Synchronising around it keeps the
    # inputs, made on the default stream, from being read early or freed while still in use.
    cuda = device.type == "cuda"
    stream = torch.cuda.stream(torch.cuda.Stream(device)) if cuda else contextlib.nullcontext()
    for done, cfg in enumerate(cfgs):
        if budget_s is not None and time.perf_counter() - started > budget_s:
            bar.write(f"budget of {budget_s:g} s spent: {len(cfgs) - done} configurations left out")
            break
        inputs = make_inputs(cfg, device)
        reference = reference_outputs(cfg, inputs)
        for backend in backends:
            bar.set_postfix_str(f"{cfg.case.label} {cfg.dtype} {cfg.mode} {backend.name}", refresh=False)
            row = describe(cfg, backend.name, device, copy_gbps) | env
            if cuda:
                torch.cuda.synchronize(device)
            with stream:
                row.update(measure_backend(backend, cfg, inputs, reference, device))
            if cuda:
                torch.cuda.synchronize(device)
            row["timestamp"] = results.now()  # when this row was measured
            derive(row)
            rows.append(row)
            bar.update()
        for name, reason in skipped.items():
            row = describe(cfg, name, device, copy_gbps) | env
            row.update(status=f"skipped: {reason}", ok=False, timestamp=results.now())
            derive(row)
            rows.append(row)
            bar.update()
    bar.close()
    return results.write_rows(out, rows)
