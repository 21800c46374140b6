"""Training-step benchmark: a ResNet-50 step with and without tritonbn, eager and compiled, and the share of
the step that batch norm and its activation cost (the guide's "computational overhead" claim).

Variants: `eager`; `fused` = tritonbn.fuse(model); `compile` = torch.compile(model); `compile-fused` =
torch.compile(tritonbn.fuse(model)); and those two under CUDA graphs, torch.compile(mode="reduce-overhead"):
`cudagraphs`, `cudagraphs-fused`. Precisions: bf16 autocast with channels_last, fp32 NCHW. A step is the
forward pass, backward from a fixed output gradient (no loss op adds time) and an SGD update.

BN + activation's share: each execution mode (eager, compile, cudagraphs) also times the same network with
every batch norm and ReLU replaced by the identity; share = (step - without) / step. The method is identity
replacement, not a profiler, so it counts everything those layers cost the step, launches and allocator
traffic included; the skip adds stay in both networks.

On a CPU the default network is the toy, and the compiled variants are recorded as skipped, with why.
"""

import copy
import math
import time
from dataclasses import dataclass

import torch

from . import models, results
from .timing import measure, timing_label

# name -> (tritonbn.fuse applied, torch.compile mode or None)
VARIANTS = {"eager": (False, None), "fused": (True, None), "compile": (False, "default"),
            "compile-fused": (True, "default"), "cudagraphs": (False, "reduce-overhead"),
            "cudagraphs-fused": (True, "reduce-overhead")}
# name -> (autocast dtype or None, memory format)
PRECISIONS = {"bf16-nhwc": (torch.bfloat16, torch.channels_last), "fp32-nchw": (None, torch.contiguous_format)}
SHARE_METHOD = "identity-replacement"


@dataclass(frozen=True)
class StepConfig:
    network: str = "resnet50"
    batches: tuple[int, ...] = (64, 256)
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    variants: tuple[str, ...] = tuple(VARIANTS)
    seed: int = 0


# The interpreter runs kernels one program at a time, so ResNet-50 would take hours on a CPU: there the
# step defaults to the toy network, whose timings only show that the benchmark works.
CPU_STEP_CONFIG = StepConfig(network="toy", batches=(2,))


def skip_reason(variant: str, device: torch.device) -> str | None:
    mode = VARIANTS[variant][1]
    if mode == "reduce-overhead" and device.type != "cuda":
        return "CUDA graphs (torch.compile mode='reduce-overhead') need a CUDA device"
    if mode is not None and device.type != "cuda":
        return ("torch.compile is not timed on a CPU: Inductor's C++ build takes minutes per network, and "
                "CPU timings are not performance")
    return None


@dataclass
class Timed:
    median_ms: float
    p20_ms: float
    p80_ms: float
    first_s: float  # the first step alone, compilation included
    fused_layers: int


def time_step(base: torch.nn.Module, variant: str, precision: str, batch: int, image: int, classes: int,
              device: torch.device) -> Timed:
    """Time training steps of a copy of `base` as `variant` runs it, then free what the variant held
    (compiled code, CUDA graph pools, cached blocks) before the next one is built."""
    import torch._dynamo as dynamo

    try:
        return _time_step(base, variant, precision, batch, image, classes, device)
    finally:
        dynamo.reset()  # also keeps every compiled variant far from Dynamo's recompile limit
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _time_step(base, variant, precision, batch, image, classes, device) -> Timed:
    fused, mode = VARIANTS[variant]
    cast, fmt = PRECISIONS[precision]
    model = copy.deepcopy(base).to(device=device, memory_format=fmt)
    fused_layers = 0
    if fused:
        import tritonbn

        model = tritonbn.fuse(model)
        fused_layers = len(model.tritonbn_fuse_report.fused)
    if mode is not None:
        model = torch.compile(model, mode=mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 3, image, image, generator=generator).to(device).contiguous(memory_format=fmt)
    dy = torch.randn(batch, classes, generator=generator).to(device=device, dtype=cast or torch.float32)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=cast, enabled=cast is not None):
            out = model(x)
        out.backward(dy.to(out.dtype))  # no copy where autocast gave the logits the expected dtype
        optimizer.step()

    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    # A model's step runs for milliseconds on a GPU: a second of them; on a CPU the first step was the warm-up.
    median, p20, p80 = measure(step, device, warmup_ms=200, rep_ms=1000, cpu_warmup=False)
    return Timed(median, p20, p80, first, fused_layers)


def _describe(cfg: StepConfig, source: str, bn_layers: int, batch: int, precision: str, variant: str,
              label: str) -> dict:
    fused, mode = VARIANTS[variant]
    return {"network": cfg.network, "model": source, "batch": batch, "dtype": precision.split("-")[0],
            "layout": precision.split("-")[1], "variant": variant, "fused": fused, "compile_mode": mode or "none",
            "status": "", "bn_layers": bn_layers, "fused_layers": math.nan, "step_ms": math.nan,
            "step_p20_ms": math.nan, "step_p80_ms": math.nan, "first_step_s": math.nan,
            "without_bn_act_ms": math.nan, "bn_act_ms": math.nan, "bn_act_share_pct": math.nan,
            "speedup_vs_eager": math.nan, "speedup_vs_compile": math.nan, "share_method": SHARE_METHOD,
            "timing": label}


def _failure(exc: Exception) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "oom"
    return "error: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def run(cfg: StepConfig, device: torch.device, progress=lambda message: None) -> list[dict]:
    """One row per (batch, precision, variant); failures and skips are rows too, with their reason."""
    network = models.NETWORKS[cfg.network]
    torch.manual_seed(cfg.seed)
    base, source = models.build(network)
    plain = models.without_bn_act(copy.deepcopy(base))
    env, rows = results.environment(device), []
    for batch in cfg.batches:
        for precision in cfg.precisions:
            without = {}  # compile mode -> the BN-less network's step time (fusing changes nothing there)
            for variant in cfg.variants:
                progress(f"step: {network.name} batch {batch} {precision} {variant}")
                label = timing_label(device, tritonbn=VARIANTS[variant][0])
                row = _describe(cfg, source, models.batch_norm_layers(base), batch, precision, variant, label)
                row |= env
                rows.append(row)
                reason = skip_reason(variant, device)
                if reason is not None:
                    row["status"] = f"skipped: {reason}"
                    continue
                mode = VARIANTS[variant][1]
                try:
                    timed = time_step(base, variant, precision, batch, network.image, network.classes, device)
                    if mode not in without:
                        plain_variant = next(v for v, (fused, m) in VARIANTS.items() if m == mode and not fused)
                        without[mode] = time_step(plain, plain_variant, precision, batch, network.image,
                                                  network.classes, device).median_ms
                except Exception as exc:  # one failing variant must not lose the others; the row says why
                    row["status"] = _failure(exc)
                    continue
                row.update(status="ok", fused_layers=timed.fused_layers, step_ms=timed.median_ms,
                           step_p20_ms=timed.p20_ms, step_p80_ms=timed.p80_ms, first_step_s=timed.first_s,
                           without_bn_act_ms=without[mode], bn_act_ms=timed.median_ms - without[mode],
                           bn_act_share_pct=100.0 * (timed.median_ms - without[mode]) / timed.median_ms)
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    by_key = {(r["batch"], r["dtype"], r["layout"], r["variant"]): r for r in rows}
    for row in rows:
        for base in ("eager", "compile"):
            ref = by_key.get((row["batch"], row["dtype"], row["layout"], base))
            row[f"speedup_vs_{base}"] = ref["step_ms"] / row["step_ms"] if ref is not None else math.nan


def format_table(rows: list[dict]) -> str:
    header = (f"{'batch':>5} {'precision':<10}{'variant':<18}{'step ms':>10}{'no BN+act ms':>14}{'BN+act':>9}"
              f"{'vs eager':>10}  status")
    lines = [header]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['dtype'] + '-' + r['layout']:<10}{r['variant']:<18}{r['step_ms']:>10.4g}"
                     f"{r['without_bn_act_ms']:>14.4g}{r['bn_act_share_pct']:>8.1f}%{r['speedup_vs_eager']:>9.3g}x"
                     f"  {r['status']}")
    variants = {}
    for r in rows:
        variants.setdefault(r["timing"], []).append(r["variant"])
    timing = "; ".join(f"{label} ({', '.join(dict.fromkeys(names))})" for label, names in variants.items())
    lines.append(f"model: {rows[0]['model']}; timing: {timing}; BN+act share measured by "
                 f"{SHARE_METHOD} (every BN and ReLU replaced by identity, skip adds kept)")
    return "\n".join(lines)
