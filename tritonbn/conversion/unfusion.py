"""`unfuse`: turn the fused tritonbn modules of a model back into plain PyTorch modules."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..activations import REGISTRY
from ..modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..sync import SyncBatchNormAct
from .fused_graph import UNFUSED_CLASS_OF, fused_residual_act, keep_everything_of, unfused_like
from .fused_sequential import FusedSequential
from .fusion import REPORT_ATTRIBUTE, copy_model
from .timm_layers import applies_activation, unfused_norm_act


class _ThenActivation:
    """Mixin for a plain batch norm class: ``act(bn(input) + residual)`` with torch ops only."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(input)
        if residual is not None:
            out = out + residual
        return self.act(out)


class BatchNormThenAct1d(_ThenActivation, nn.BatchNorm1d):
    """nn.BatchNorm1d followed by ``act``; what `unfuse` puts where a fused module is not traced."""


class BatchNormThenAct2d(_ThenActivation, nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ``act``; what `unfuse` puts where a fused module is not traced."""


class BatchNormThenAct3d(_ThenActivation, nn.BatchNorm3d):
    """nn.BatchNorm3d followed by ``act``; what `unfuse` puts where a fused module is not traced."""


class SyncBatchNormThenAct(_ThenActivation, nn.SyncBatchNorm):
    """nn.SyncBatchNorm followed by ``act``; what `unfuse` puts where a SyncBatchNormAct is not traced."""


_THEN_ACT_CLASS_OF = {
    BatchNormAct1d: BatchNormThenAct1d, BatchNormAct2d: BatchNormThenAct2d, BatchNormAct3d: BatchNormThenAct3d,
    SyncBatchNormAct: SyncBatchNormThenAct,
}


def _activation_call(graph: fx.Graph, value: fx.Node, activation: str, negative_slope: float) -> fx.Node:
    """``activation(value)`` as a call of its functional form, or ``value`` for identity (which has none)."""
    entry = REGISTRY[activation]
    if not entry.functions:
        return value
    arguments = (value, negative_slope) if entry.has_slope else (value,)
    return graph.call_function(entry.functions[0], arguments)


def _fused_call(traced: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node, object] | None:
    """(module path, input, residual or None) of a node calling a fused module, else None."""
    if node.op == "call_module" and type(traced.get_submodule(node.target)) in UNFUSED_CLASS_OF:
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        return node.target, node.args[0] if node.args else node.kwargs["input"], residual
    if node.op == "call_function" and node.target is fused_residual_act:
        module, input, residual = node.args
        return module.target, input, residual
    return None


def _unfused(fused: nn.Module) -> nn.Module:
    """The batch norm a fused module stands for, sharing its state: timm's module it replaced, else the
    plain torch batch norm."""
    timm_module = unfused_norm_act(fused)
    return timm_module if timm_module is not None else unfused_like(UNFUSED_CLASS_OF[type(fused)], fused)


def _unfuse_graph(traced: fx.GraphModule) -> None:
    graph = traced.graph
    plain_modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        call = _fused_call(traced, node)
        if call is None:
            continue
        target, input, residual = call
        fused = traced.get_submodule(target)
        if target not in plain_modules:
            plain_modules[target] = _unfused(fused)
        with graph.inserting_before(node):
            out = graph.call_module(target, (input,))
            if residual is not None:
                out = graph.call_function(operator.add, (out, residual))
            # A timm module with an activation applies it itself (no residual add was fused into it then).
            if not applies_activation(plain_modules[target]):
                out = _activation_call(graph, out, fused.activation, fused.negative_slope)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    for node in graph.find_nodes(op="get_attr"):
        if node.target in plain_modules and not node.users:
            graph.erase_node(node)
    for target, plain in plain_modules.items():
        traced.add_submodule(target, plain)
    graph.lint()
    traced.recompile()


def _unfuse_graph_module(traced: fx.GraphModule) -> fx.GraphModule:
    _unfuse_graph(traced)
    plain = fx.GraphModule(traced, traced.graph, type(traced).__name__)
    keep_everything_of(traced, plain)
    return plain


def _unfuse_modules(model: nn.Module) -> nn.Module:
    """Replace fused modules outside a graph by the timm module they replaced or by ``BatchNormThenAct*d``,
    and make every `FusedSequential` an nn.Sequential again (it holds the plain modules)."""
    def then_activation(fused: nn.Module) -> nn.Module:
        timm_module = unfused_norm_act(fused)  # computes its own activation: the one `fuse` took from it
        if timm_module is not None:
            return timm_module
        plain = unfused_like(_THEN_ACT_CLASS_OF[type(fused)], fused)
        plain.act = REGISTRY[fused.activation].make_module(fused.negative_slope).train(fused.training)
        return plain

    if type(model) in _THEN_ACT_CLASS_OF:
        return then_activation(model)
    for parent in list(model.modules()):
        if type(parent) is FusedSequential:
            parent.__class__ = nn.Sequential
        for key, fused in parent._modules.items():
            if type(fused) in _THEN_ACT_CLASS_OF:
                parent._modules[key] = then_activation(fused)
    return model


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn every fused tritonbn module of ``model`` back into plain PyTorch modules.

    In a GraphModule (what `fuse` returns, and what it puts in place of a module with hooks) each fused
    call becomes ``nn.BatchNorm*d`` (or ``nn.SyncBatchNorm``) followed by ``operator.add`` for the residual
    and the torch.nn.functional activation, and the GraphModule becomes a plain ``torch.fx.GraphModule``
    holding every module, parameter, buffer, attribute and hook of the original one (pickling or
    deep-copying it then follows torch.fx, which keeps only what the graph uses and no forward or
    backward hooks).  A `FusedSequential` (`fuse`'s fallback) becomes the nn.Sequential it was.  Fused
    modules elsewhere become ``BatchNormThenAct*d``: a subclass of the plain batch norm that applies the
    add and activation with torch ops.  A fused module that `fuse` made from one of timm's batch norm +
    activation modules becomes that timm class again, in a graph or not, with the ``drop`` and ``act``
    modules it had.  State_dict keys do not change, so checkpoints load into the original model.
    """
    if not inplace:
        model = copy_model(model)
    graph_modules = [name for name, module in model.named_modules() if isinstance(module, fx.GraphModule)]
    # named_modules lists a module before the modules inside it: reversed, a GraphModule's plain
    # replacement is made once those of the GraphModules inside it are in place.
    for name in reversed(graph_modules):
        plain = _unfuse_graph_module(model.get_submodule(name))
        if name:
            model.set_submodule(name, plain)
        else:
            model = plain
    # The report describes the fused model, and pickling it would need tritonbn.
    model.__dict__.pop(REPORT_ATTRIBUTE, None)
    return _unfuse_modules(model)
