"""The implementations a sweep compares. Each backend is a function with `tritonbn.batch_norm_act`'s signature.

- `tritonbn`: the package's fused kernels.
- `eager`: F.batch_norm (cuDNN wherever PyTorch picks it), then the add, then the activation: what users
  run today, and the reference every other backend's output is checked against.
- `compile`: torch.compile of that same eager function.
- `flag_gems`, `apex`: other Triton/CUDA libraries, used only when importable.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tritonbn import reference

from .constants import BACKENDS


def eager_batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                         eps=1e-5, *, activation="relu", negative_slope=0.01, residual=None):
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return reference.activate(z, activation, negative_slope)


def tritonbn_batch_norm_act(*args, **kwargs):
    import tritonbn  # resolved per call, so the harness imports even while the core is being written

    return tritonbn.batch_norm_act(*args, **kwargs)


_compiled = None


def compiled_batch_norm_act(*args, **kwargs):
    """torch.compile of the eager function, specialised per shape as in a network with fixed shapes.

    A sweep compiles it for many shapes, dtypes and activations; past Dynamo's recompile limit it would
    silently run eager code under the `compile` label, so the limits are raised to cover a whole sweep.
    The `bwd` mode times the same graph's backward again and again (retain_graph=True), which compiled
    backwards refuse when they donate saved buffers to their outputs; donation only lets the backward
    reuse that memory, so it is switched off.
    """
    global _compiled
    if _compiled is None:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4096)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
        functorch_config.donated_buffer = False
        _compiled = torch.compile(eager_batch_norm_act, dynamic=False)
    return _compiled(*args, **kwargs)


def flag_gems_batch_norm_act(*args, **kwargs):
    import flag_gems

    with flag_gems.use_gems():
        return eager_batch_norm_act(*args, **kwargs)


_apex_modules: dict = {}


def apex_batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                        eps=1e-5, *, activation="relu", negative_slope=0.01, residual=None):
    """apex.contrib.groupbn's NHWC BatchNorm (+ReLU, +add): fp16 channels_last 4-D only.

    Its module owns its parameters and running stats, so ours are copied in once per shape.
    """
    from apex.contrib.groupbn.batch_norm import BatchNorm2d_NHWC

    channels = input.shape[1]
    key = (channels, activation, input.device)
    if key not in _apex_modules:
        module = BatchNorm2d_NHWC(channels, fuse_relu=activation == "relu").to(input.device)
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        _apex_modules[key] = module
    module = _apex_modules[key]
    module.train(training)
    module.momentum, module.eps = momentum, eps
    nhwc = input.permute(0, 2, 3, 1)
    out = module(nhwc, residual.permute(0, 2, 3, 1)) if residual is not None else module(nhwc)
    return out.permute(0, 3, 1, 2)


def _apex_unsupported(dtype, layout, ndim, activation) -> str | None:
    if dtype != torch.float16 or layout != "nhwc" or ndim != 4 or activation not in ("relu", "identity"):
        return "apex groupbn supports fp16 channels_last 4-D inputs with relu or identity only"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    # Why a configuration cannot run on this backend (None when it can).
    unsupported: Callable = lambda dtype, layout, ndim, activation: None


def _importable(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure (missing, broken build) means the backend is skipped
        return f"{module} is not importable ({type(exc).__name__}: {exc})"
    return None


def _tritonbn_missing() -> str | None:
    if hasattr(importlib.import_module("tritonbn"), "batch_norm_act"):
        return None
    return "tritonbn.batch_norm_act is not available in this install"


# name -> (function, why it cannot run at all or None, which configurations it cannot run)
_REGISTRY = {
    "tritonbn": (tritonbn_batch_norm_act, _tritonbn_missing, None),
    "eager": (eager_batch_norm_act, lambda: None, None),
    "compile": (compiled_batch_norm_act, lambda: None, None),
    "flag_gems": (flag_gems_batch_norm_act, lambda: _importable("flag_gems"), None),
    "apex": (apex_batch_norm_act, lambda: _importable("apex.contrib.groupbn.batch_norm"), _apex_unsupported),
}


def resolve(names) -> tuple[list[Backend], dict[str, str]]:
    """The runnable backends among `names`, and a stated reason for each one skipped."""
    backends, skipped = [], {}
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        fn, missing, unsupported = _REGISTRY[name]
        reason = missing()
        if reason is not None:
            skipped[name] = reason
        elif unsupported is None:
            backends.append(Backend(name, fn))
        else:
            backends.append(Backend(name, fn, unsupported))
    return backends, skipped
