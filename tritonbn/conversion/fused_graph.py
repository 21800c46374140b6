"""The GraphModule `fuse` returns, and the functions its code calls besides modules.

`FusedGraphModule` keeps every submodule, parameter, buffer, plain attribute and hook of the model it was
traced from, also through copy.deepcopy and pickling.  Its graph calls `fused_residual_act` for
``act(bn(x) + y)`` and `check_traced_default` for each ``forward`` parameter traced at its default.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .. import reference
from ..modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, batch_norm_like
from ..sync import SyncBatchNormAct
from .hooks import HOOK_ATTRIBUTES

# Each fused class and the torch batch norm it normalises as: what `unfuse` puts back.
UNFUSED_CLASS_OF = {
    BatchNormAct1d: nn.BatchNorm1d, BatchNormAct2d: nn.BatchNorm2d, BatchNormAct3d: nn.BatchNorm3d,
    SyncBatchNormAct: nn.SyncBatchNorm,
}


def unfused_like(batch_norm_class: type, fused: nn.Module) -> nn.Module:
    """A ``batch_norm_class`` (a torch batch norm, or a subclass) with the options and the very state of
    fused module ``fused``, and its process group for a SyncBatchNormAct."""
    group = {"process_group": fused.process_group} if hasattr(fused, "process_group") else {}
    return batch_norm_like(batch_norm_class, fused, **group)


# ---------------------------------------------------------------------------------------------------
# What the graph calls
# ---------------------------------------------------------------------------------------------------

def _first_proxy(*values) -> fx.Proxy | None:
    """The first torch.fx Proxy of ``values``: these functions are being traced, and record themselves."""
    return next((value for value in values if isinstance(value, fx.Proxy)), None)


def _kernel_adds(input: torch.Tensor, residual) -> bool:
    """Whether the fused kernel can add ``residual`` as ``bn(input) + residual`` would: a floating tensor
    on the input's device that broadcasts to the input's shape.  A 0-dim tensor is left out because
    type promotion treats it as a scalar."""
    if not (isinstance(residual, torch.Tensor) and residual.is_floating_point() and residual.dim() > 0
            and residual.device == input.device and residual.dim() <= input.dim()):
        return False
    return all(size in (1, full) for size, full in zip(reversed(residual.shape), reversed(input.shape)))


def fused_residual_act(module: nn.Module, input: torch.Tensor, residual) -> torch.Tensor:
    """``act(bn(input) + residual)`` with the fused ``module``: what `fuse` calls for ``act(bn(x) + y)``.

    The fused kernel adds a residual of the input's shape (one that broadcasts to it is expanded); any
    other operand ``+`` accepts -- one that broadcasts the sum to a larger shape, a scalar, an integer
    tensor -- goes through plain batch norm and torch ops, so the fused model computes what the original
    computed for every operand.  Under torch.fx tracing (re-tracing, or unpickling a fused GraphModule)
    it stays one call, as a leaf module would.
    """
    proxy = _first_proxy(input, residual)
    if proxy is not None:
        return proxy.tracer.create_proxy("call_function", fused_residual_act, (module, input, residual), {})
    if _kernel_adds(input, residual):
        return module(input, residual if residual.shape == input.shape else residual.expand_as(input))
    plain = unfused_like(UNFUSED_CLASS_OF[type(module)], module)
    return reference.activate(plain(input) + residual, module.activation, module.negative_slope)


def is_default(value, default) -> bool:
    """Whether ``value`` passed for a parameter traced at ``default`` takes the traced branch."""
    return value is default or (type(value) is type(default) and value == default)


@fx.node.has_side_effect  # a graph pass must not drop it as dead code
def check_traced_default(value, default, name: str) -> None:
    """Raise unless ``value`` is ``default``, the value of ``forward``'s parameter ``name`` that `fuse`
    traced the model with; the fused graph computes that value's branch only."""
    proxy = _first_proxy(value)
    if proxy is not None:
        proxy.tracer.create_proxy("call_function", check_traced_default, (value, default, name), {})
        return
    if is_default(value, default):
        return
    given = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    raise ValueError(f"tritonbn.fuse traced forward with {name}={default!r} and the fused model computes only "
                     f"that case; got {name}={given}. Call the original model for other values.")


# ---------------------------------------------------------------------------------------------------
# A GraphModule that keeps the whole model
# ---------------------------------------------------------------------------------------------------

def _is_skeleton(module: nn.Module) -> bool:
    """An empty container GraphModule creates on the path to a module its graph uses."""
    return type(module) is nn.Module


def keep_everything_of(source: nn.Module, target: nn.Module) -> None:
    """Give GraphModule ``target`` every submodule, parameter, buffer and plain attribute of ``source``
    that its graph does not use, in ``source``'s order and train/eval modes, and ``source``'s hooks.

    GraphModule copies only what its graph references, into fresh containers, and no hooks; where
    ``target`` already holds a module of its own at a path (a fused replacement) that module stays.
    The hook dicts are shared, not copied, so that the handles ``register_*_hook`` returned for
    ``source`` still remove them.
    """
    target.training = source.training
    target.__dict__.update((name, source.__dict__[name]) for name in HOOK_ATTRIBUTES if name in source.__dict__)
    for slot in ("_parameters", "_buffers", "_modules"):
        own, theirs = getattr(target, slot), getattr(source, slot)
        merged = {name: own.get(name, value) for name, value in theirs.items()}
        merged.update((name, value) for name, value in own.items() if name not in merged)
        own.clear()
        own.update(merged)
    target._non_persistent_buffers_set |= source._non_persistent_buffers_set
    for name, value in vars(source).items():
        if not name.startswith("_") and name not in vars(target) and not hasattr(type(target), name):
            target.__dict__[name] = value
    for name, child in target._modules.items():
        original = source._modules.get(name)
        if child is not original and child is not None and original is not None and _is_skeleton(child):
            keep_everything_of(original, child)


class FusedGraphModule(fx.GraphModule):
    """The GraphModule `fuse` returns: it keeps everything of the model it was traced from (see
    `keep_everything_of`), also through copy.deepcopy and pickling, where a GraphModule would rebuild
    itself from its graph's references only."""

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str | None = None):
        super().__init__(root, graph, class_name or getattr(root, "_graphmodule_cls_name", "GraphModule"))
        keep_everything_of(root, self)

    def _deepcopy_init(self):
        # GraphModule.__deepcopy__ calls this with a module holding a deep copy of our whole state.
        return FusedGraphModule.__init__

    def __copy__(self):
        return FusedGraphModule(self, self.graph)

    def __reduce__(self):
        _, arguments = super().__reduce__()
        return _rebuild_fused_graph_module, arguments


def _module_with_state(state: dict) -> nn.Module:
    module = nn.Module.__new__(nn.Module)
    module.__dict__ = state
    return module


def _rebuild_fused_graph_module(state: dict, import_block: str) -> FusedGraphModule:
    """Unpickle a `FusedGraphModule`: torch.fx rebuilds the graph from the saved code, and the saved
    state supplies everything else."""
    graph = fx.graph_module.reduce_graph_module(state, import_block).graph
    return FusedGraphModule(_module_with_state(state), graph)
