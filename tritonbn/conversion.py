"""Convert existing models to the fused modules (`fuse`) and back to plain PyTorch (`unfuse`).

`fuse` traces the model with torch.fx and rewrites every ``nn.BatchNorm{1,2,3}d`` whose output feeds
only an activation -- optionally through a residual add first, ``act(bn(x) + identity)`` -- into one
``BatchNormAct{1,2,3}d`` call.  The fused module is registered under the batch norm's own name and
shares its parameters and buffers, so ``state_dict`` keys are unchanged.  Models that torch.fx cannot
trace fall back to rewriting adjacent (batch norm, activation) pairs inside ``nn.Sequential``.

Every call returns a model carrying a `FuseReport` as ``model.tritonbn_fuse_report`` and logs it.
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

REPORT_ATTRIBUTE = "tritonbn_fuse_report"

_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DEFAULT_SLOPE = 0.01


@dataclass
class FusedLayer:
    """One batch norm that `fuse` replaced: its qualified name, the activation and the residual add."""

    name: str
    activation: str
    negative_slope: float
    residual: bool


@dataclass
class FuseReport:
    """What `fuse` did: ``method`` is "fx" or "sequential" (the fallback for untraceable models),
    ``fused`` lists the replaced batch norms, ``unfused`` maps every other batch norm to the reason."""

    method: str
    fused: list[FusedLayer] = field(default_factory=list)
    unfused: dict[str, str] = field(default_factory=dict)
    trace_error: str | None = None

    def summary(self) -> str:
        lines = [f"tritonbn.fuse ({self.method}): fused {len(self.fused)}, left {len(self.unfused)} unfused"]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace the model: {self.trace_error}")
        for layer in self.fused:
            residual = " + residual" if layer.residual else ""
            lines.append(f"  fused   {layer.name}{residual} -> {layer.activation}")
        for name, reason in self.unfused.items():
            lines.append(f"  unfused {name}: {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Recognising activations
# ---------------------------------------------------------------------------------------------------

def _module_activation(module: nn.Module) -> tuple[str, float] | None:
    """(activation name, negative slope) of an activation module the kernels implement, else None."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", _DEFAULT_SLOPE
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.ReLU6:
        return "relu6", _DEFAULT_SLOPE
    if kind is nn.ELU and module.alpha == 1.0:
        return "elu", _DEFAULT_SLOPE
    if kind is nn.SiLU:
        return "silu", _DEFAULT_SLOPE
    if kind is nn.GELU and module.approximate == "none":
        return "gelu", _DEFAULT_SLOPE
    if kind is nn.Hardswish:
        return "hardswish", _DEFAULT_SLOPE
    if kind is nn.Identity:
        return "identity", _DEFAULT_SLOPE
    return None


# Functional activations whose only argument besides the input is ``inplace``.
_PLAIN_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.relu6: "relu6", F.silu: "silu", F.hardswish: "hardswish",
}
_PLAIN_METHODS = {"relu": "relu", "relu_": "relu"}


def _argument(node: fx.Node, position: int, name: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _function_activation(node: fx.Node) -> tuple[str, float] | None:
    """(activation name, negative slope) of a call_function/call_method activation node, else None."""
    if node.op == "call_method":
        name = _PLAIN_METHODS.get(node.target)
        return None if name is None else (name, _DEFAULT_SLOPE)
    if node.op != "call_function":
        return None
    if node.target in _PLAIN_FUNCTIONS:
        return _PLAIN_FUNCTIONS[node.target], _DEFAULT_SLOPE
    if node.target in (F.leaky_relu, F.leaky_relu_):
        slope = _argument(node, 1, "negative_slope", _DEFAULT_SLOPE)
        return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
    if node.target in (F.elu, F.elu_):
        return ("elu", _DEFAULT_SLOPE) if _argument(node, 1, "alpha", 1.0) == 1.0 else None
    if node.target is F.gelu:
        return ("gelu", _DEFAULT_SLOPE) if _argument(node, 1, "approximate", "none") == "none" else None
    return None


def _node_activation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, float] | None:
    if node.op == "call_module":
        return _module_activation(modules[node.target])
    return _function_activation(node)


def _residual_of_add(node: fx.Node, operand: fx.Node) -> fx.Node | None:
    """The other operand of ``operand + other`` when ``node`` is such an add, else None.

    The other operand must be a tensor computed by the graph: parameters and buffers (get_attr) are
    usually broadcast biases, which the fused kernel does not take.
    """
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        if len(node.args) != 2 or any(key != "alpha" for key in node.kwargs) or node.kwargs.get("alpha", 1) != 1:
            return None
        first, second = node.args
    elif node.op == "call_method" and node.target in ("add", "add_"):
        # ``identity.add_(bn(x))`` would mutate ``identity``; only the batch norm output may be mutated.
        if len(node.args) != 2 or node.kwargs or node.args[0] is not operand:
            return None
        first, second = node.args
    else:
        return None
    other = second if first is operand else first
    if other is operand or not isinstance(other, fx.Node) or other.op == "get_attr":
        return None
    return other


# ---------------------------------------------------------------------------------------------------
# Building modules that share state
# ---------------------------------------------------------------------------------------------------

def _fused_classes() -> dict[type, type]:
    from tritonbn.modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

    return {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d}


def factory_kwargs_of(bn: nn.Module) -> dict:
    """device and dtype for a module replacing batch norm ``bn``."""
    reference = bn.weight if bn.weight is not None else bn.running_mean
    return {} if reference is None else {"device": reference.device, "dtype": reference.dtype}


def share_batch_norm_state(source: nn.Module, target: nn.Module) -> None:
    """Make batch norm ``target`` use the very parameter and buffer objects, and the train/eval mode, of
    ``source`` (optimizers built on ``source`` keep working)."""
    for name in ("weight", "bias"):
        setattr(target, name, getattr(source, name))
    for name, buffer in source._buffers.items():
        setattr(target, name, buffer)
    target.train(source.training)


def _fused_from_batch_norm(bn: nn.Module, activation: str, negative_slope: float) -> nn.Module:
    fused = _fused_classes()[type(bn)](
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, activation=activation,
        negative_slope=negative_slope, **factory_kwargs_of(bn),
    )
    share_batch_norm_state(bn, fused)
    return fused


# ---------------------------------------------------------------------------------------------------
# fuse
# ---------------------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """Keeps already fused tritonbn modules as leaves instead of tracing into their kernels."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module).__module__.startswith("tritonbn.") or super().is_leaf_module(module, qualified_name)


def _match_pattern(bn_node: fx.Node, modules) -> tuple[list[fx.Node], fx.Node | None, tuple[str, float]] | str:
    """Nodes to replace (bn, [add], [activation]), the residual and the activation; or why not."""
    users = list(bn_node.users)
    if len(users) != 1:
        return f"output used by {len(users)} nodes"
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "called with more than the input"
    follower = users[0]
    activation = _node_activation(follower, modules)
    if activation is not None and follower.args[0] is bn_node:
        return [bn_node, follower], None, activation
    residual = _residual_of_add(follower, bn_node)
    if residual is None:
        return f"output feeds {follower.format_node()}, not a supported activation or residual add"
    after_add = list(follower.users)
    if len(after_add) == 1:
        activation = _node_activation(after_add[0], modules)
        if activation is not None and after_add[0].args[0] is follower:
            return [bn_node, follower, after_add[0]], residual, activation
    # The sum is used elsewhere or not by an activation: fuse the add alone.
    return [bn_node, follower], residual, ("identity", _DEFAULT_SLOPE)


def _fuse_graph(module: nn.Module, report: FuseReport, bn_names: list[str]) -> fx.GraphModule:
    graph = _Tracer().trace(module)
    traced = fx.GraphModule(module, graph, module.__class__.__name__)
    modules = dict(traced.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) in _PLAIN_BATCH_NORMS:
            calls.setdefault(node.target, []).append(node)
    for name in bn_names:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            report.unfused[name] = "not called in the traced forward" if not nodes else "called at several places"
            continue
        match = _match_pattern(nodes[0], modules)
        if isinstance(match, str):
            report.unfused[name] = match
            continue
        replaced, residual, (activation, slope) = match
        _replace_nodes(traced, replaced, residual, _fused_from_batch_norm(modules[name], activation, slope))
        report.fused.append(FusedLayer(name, activation, slope, residual is not None))
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _replace_nodes(traced: fx.GraphModule, replaced: list[fx.Node], residual, fused: nn.Module) -> None:
    bn_node, last = replaced[0], replaced[-1]
    args = (bn_node.args[0],) if residual is None else (bn_node.args[0], residual)
    with traced.graph.inserting_before(last):
        fused_node = traced.graph.call_module(bn_node.target, args)
    last.replace_all_uses_with(fused_node)
    for node in reversed(replaced):
        traced.graph.erase_node(node)
    traced.add_submodule(bn_node.target, fused)


def _fuse_sequential_pairs(model: nn.Module, report: FuseReport, bn_names: list[str]) -> None:
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        keys = list(container._modules)
        for key, next_key in zip(keys, keys[1:]):
            bn, follower = container._modules[key], container._modules[next_key]
            activation = _module_activation(follower) if follower is not None else None
            if type(bn) not in _PLAIN_BATCH_NORMS or activation is None or uses[id(bn)] != 1:
                continue
            container._modules[key] = _fused_from_batch_norm(bn, *activation)
            # The activation is now applied by the fused module; keep the slot so indices stay put.
            container._modules[next_key] = nn.Identity()
            report.fused.append(FusedLayer(f"{prefix}.{key}" if prefix else key, *activation, False))
    fused_names = {layer.name for layer in report.fused}
    for name in bn_names:
        if name not in fused_names:
            report.unfused[name] = "not followed by an activation inside an nn.Sequential"


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace batch norm + activation (+ residual add) patterns of ``model`` by fused tritonbn modules.

    Returns a ``torch.fx.GraphModule`` when torch.fx can trace ``model`` (only ``forward`` survives
    tracing), otherwise ``model``'s structure with (batch norm, activation) pairs inside nn.Sequential
    fused.  The returned model's ``tritonbn_fuse_report`` attribute is a `FuseReport` listing what was
    fused and why every other batch norm was not; batch norms left unfused are the same objects.

    ``inplace=False`` works on a deep copy and leaves ``model`` untouched; ``inplace=True`` skips the
    copy: the result shares parameters and buffers with ``model`` (so an optimizer built on ``model``
    keeps working), and the sequential fallback rewrites ``model`` itself.

    A residual add is fused when its other operand is a tensor computed in ``forward`` (not a parameter
    or a constant); it must have the batch norm's shape at run time, as the fused kernel adds it
    element-wise.
    """
    if not inplace:
        model = copy.deepcopy(model)
    bn_names = [name for name, module in model.named_modules() if type(module) in _PLAIN_BATCH_NORMS]
    try:
        report = FuseReport("fx")
        result = _fuse_graph(model, report, bn_names)
    except Exception as error:  # noqa: BLE001 -- tracing runs arbitrary user code; any failure means "untraceable"
        report = FuseReport("sequential", trace_error=f"{type(error).__name__}: {error}")
        _fuse_sequential_pairs(model, report, bn_names)
        result = model
    setattr(result, REPORT_ATTRIBUTE, report)
    logger.info("%s", report.summary())
    return result


# ---------------------------------------------------------------------------------------------------
# unfuse
# ---------------------------------------------------------------------------------------------------

_ACTIVATION_FUNCTIONS = {
    "relu": F.relu, "relu6": F.relu6, "elu": F.elu, "silu": F.silu, "gelu": F.gelu, "hardswish": F.hardswish,
}


def activation_module(activation: str, negative_slope: float = _DEFAULT_SLOPE) -> nn.Module:
    """The torch.nn module computing the named activation."""
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    modules = {
        "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "elu": nn.ELU, "silu": nn.SiLU,
        "gelu": nn.GELU, "hardswish": nn.Hardswish,
    }
    return modules[activation]()


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


def _fused_module_kinds() -> dict[type, tuple[type, type]]:
    """Fused class -> (plain torch class, plain class followed by the activation)."""
    from tritonbn.modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
    from tritonbn.sync import SyncBatchNormAct

    return {
        BatchNormAct1d: (nn.BatchNorm1d, BatchNormThenAct1d),
        BatchNormAct2d: (nn.BatchNorm2d, BatchNormThenAct2d),
        BatchNormAct3d: (nn.BatchNorm3d, BatchNormThenAct3d),
        SyncBatchNormAct: (nn.SyncBatchNorm, SyncBatchNormThenAct),
    }


def _plain_from_fused(fused: nn.Module, plain_class: type) -> nn.Module:
    options = {"process_group": fused.process_group} if issubclass(plain_class, nn.SyncBatchNorm) else {}
    plain = plain_class(
        fused.num_features, eps=fused.eps, momentum=fused.momentum, affine=fused.affine,
        track_running_stats=fused.track_running_stats, **options, **factory_kwargs_of(fused),
    )
    share_batch_norm_state(fused, plain)
    return plain


def _activation_call(graph: fx.Graph, value: fx.Node, activation: str, negative_slope: float) -> fx.Node:
    if activation == "identity":
        return value
    if activation == "leaky_relu":
        return graph.call_function(F.leaky_relu, (value, negative_slope))
    return graph.call_function(_ACTIVATION_FUNCTIONS[activation], (value,))


def _unfuse_graph(traced: fx.GraphModule, kinds) -> None:
    plain_modules: dict[str, nn.Module] = {}
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or type(traced.get_submodule(node.target)) not in kinds:
            continue
        fused = traced.get_submodule(node.target)
        if node.target not in plain_modules:
            plain_modules[node.target] = _plain_from_fused(fused, kinds[type(fused)][0])
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        node.args, node.kwargs = node.args[:1], {}
        with traced.graph.inserting_after(node):
            out = node if residual is None else traced.graph.call_function(operator.add, (node, residual))
        with traced.graph.inserting_after(out):
            out_act = _activation_call(traced.graph, out, fused.activation, fused.negative_slope)
        first_new = out if out is not node else out_act
        node.replace_all_uses_with(out_act, delete_user_cb=lambda user, first=first_new: user is not first)
    for target, plain in plain_modules.items():
        traced.add_submodule(target, plain)
    traced.graph.lint()
    traced.recompile()


def _unfuse_modules(model: nn.Module, kinds) -> nn.Module:
    def replacement(fused: nn.Module) -> nn.Module:
        plain = _plain_from_fused(fused, kinds[type(fused)][1])
        plain.act = activation_module(fused.activation, fused.negative_slope)
        return plain

    if type(model) in kinds:
        return replacement(model)
    for parent in model.modules():
        for key, child in parent._modules.items():
            if type(child) in kinds:
                parent._modules[key] = replacement(child)
    return model


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn every fused tritonbn module of ``model`` back into plain PyTorch modules.

    In a GraphModule (what `fuse` returns) each fused call becomes ``nn.BatchNorm*d`` (or
    ``nn.SyncBatchNorm``) followed by ``operator.add`` for the residual and the torch.nn.functional
    activation, so the result depends on PyTorch only.  Fused modules elsewhere become
    ``BatchNormThenAct*d``: a subclass of the plain batch norm that applies the add and activation
    with torch ops.  Both keep the state_dict keys, so checkpoints load into the original model.
    """
    if not inplace:
        model = copy.deepcopy(model)
    kinds = _fused_module_kinds()
    if isinstance(model, fx.GraphModule):
        _unfuse_graph(model, kinds)
    return _unfuse_modules(model, kinds)
