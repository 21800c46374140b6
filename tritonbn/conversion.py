"""Convert existing models to the fused modules (`fuse`) and back to plain PyTorch (`unfuse`).

`fuse` traces the model with torch.fx and rewrites every ``nn.BatchNorm{1,2,3}d`` whose output feeds
only an activation -- optionally through a residual add first, ``act(bn(x) + identity)`` -- into one
``BatchNormAct{1,2,3}d`` call.  The fused module is registered under the batch norm's own name and
shares its parameters and buffers.  The result keeps every submodule, parameter, buffer and plain
attribute of the model, in order and in the same train/eval mode, so ``state_dict`` keys are unchanged
and checkpoints load either way.  Hooks keep running (see `fuse`): a batch norm or activation module
with hooks stays unfused, and a module with hooks is fused as a model of its own that carries them.
Models that torch.fx cannot trace fall back to `FusedSequential`: ``nn.Sequential`` containers that fuse
their (batch norm, activation) pairs when called whole and still hold the plain modules.

Every call returns a model carrying a `FuseReport` as ``model.tritonbn_fuse_report`` and logs it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.proxy import TraceError
from torch.nn.modules.batchnorm import _BatchNorm

from . import reference

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
    """What `fuse` did: ``method`` is "fx" or "sequential" (the `FusedSequential` fallback for untraceable
    models), ``fused`` lists the replaced batch norms, ``unfused`` maps every other batch norm to the reason.

    ``specialized`` maps each ``forward`` parameter that has a default value to that value: torch.fx
    traced ``forward`` with the default, and the fused model raises a ValueError when called with
    another value for it (rather than silently computing the default's branch)."""

    method: str
    fused: list[FusedLayer] = field(default_factory=list)
    unfused: dict[str, str] = field(default_factory=dict)
    trace_error: str | None = None
    specialized: dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"tritonbn.fuse ({self.method}): fused {len(self.fused)}, left {len(self.unfused)} unfused"]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace the model: {self.trace_error}")
        if self.specialized:
            fixed = ", ".join(f"{name}={value!r}" for name, value in self.specialized.items())
            lines.append(f"  forward traced with its defaults {fixed}; other values raise a ValueError")
        for layer in self.fused:
            residual = " + residual" if layer.residual else ""
            lines.append(f"  fused   {layer.name}{residual} -> {layer.activation}")
        for name, reason in self.unfused.items():
            lines.append(f"  unfused {name}: {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------

# The hooks nn.Module.__call__ runs around forward, and what to call them in a report.  The other call
# hook dicts (_forward_hooks_with_kwargs, _forward_hooks_always_called, ...) only flag entries of these.
_CALL_HOOKS = {
    "_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook",
}

# Every attribute a module's own hooks live in.  A GraphModule starts with none of its root's hooks.
_HOOK_ATTRIBUTES = (
    *_CALL_HOOKS, "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_is_full_backward_hook", "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _call_hooks(module: nn.Module) -> str:
    """The kinds of hooks ``module.__call__`` runs for ``module`` ("forward hook and backward hook"), or ""."""
    return " and ".join(kind for attribute, kind in _CALL_HOOKS.items() if module.__dict__.get(attribute))


def _bypassed(hooks: str, name: str) -> str:
    return f"{hooks} on {name}, which a fused call would bypass"


def _has_legacy_backward_hook(module: nn.Module) -> bool:
    """Whether ``module`` has a hook from the deprecated ``register_backward_hook``: it gets the gradients
    of the last operation ``module`` ran, which fusing anything inside ``module`` may change."""
    return bool(module.__dict__.get("_backward_hooks")) and module.__dict__.get("_is_full_backward_hook") is False


def _legacy_hook_reason(name: str) -> str:
    owner = name or "the model"
    return (f"{owner} has a backward hook from register_backward_hook, which sees the gradients of {owner}'s "
            "last operation; fusing inside it could change them")


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


@functools.cache
def _takes_bias_flag(batch_norm_class: type) -> bool:
    # torch 2.13 added the keyword-only ``bias`` to nn.BatchNorm*d and nn.SyncBatchNorm; 2.11 lacks it.
    return "bias" in inspect.signature(batch_norm_class.__init__).parameters


def batch_norm_like(batch_norm_class: type, bn: nn.Module, **options) -> nn.Module:
    """A ``batch_norm_class`` with the options of batch norm ``bn`` that shares its state (see
    `share_batch_norm_state`); ``options`` are extra constructor arguments."""
    if _takes_bias_flag(batch_norm_class):
        options["bias"] = bn.bias is not None
    module = batch_norm_class(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, **options, **factory_kwargs_of(bn),
    )
    # Without the flag (older torch) the bias of None arrives here, with the other shared tensors.
    share_batch_norm_state(bn, module)
    return module


def _fused_from_batch_norm(bn: nn.Module, activation: str, negative_slope: float) -> nn.Module:
    return batch_norm_like(_fused_classes()[type(bn)], bn, activation=activation, negative_slope=negative_slope)


# ---------------------------------------------------------------------------------------------------
# The fused residual add
# ---------------------------------------------------------------------------------------------------

def _first_proxy(*values) -> fx.Proxy | None:
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
    plain = batch_norm_like(_fused_module_kinds()[type(module)][0], module, **_group_option(module))
    return reference.activate(plain(input) + residual, module.activation, module.negative_slope)


# ---------------------------------------------------------------------------------------------------
# A GraphModule that keeps the whole model
# ---------------------------------------------------------------------------------------------------

def _is_skeleton(module: nn.Module) -> bool:
    """An empty container GraphModule creates on the path to a module its graph uses."""
    return type(module) is nn.Module


def _keep_everything_of(source: nn.Module, target: nn.Module) -> None:
    """Give GraphModule ``target`` every submodule, parameter, buffer and plain attribute of ``source``
    that its graph does not use, in ``source``'s order and train/eval modes, and ``source``'s hooks.

    GraphModule copies only what its graph references, into fresh containers, and no hooks; where
    ``target`` already holds a module of its own at a path (a fused replacement) that module stays.
    The hook dicts are shared, not copied, so that the handles ``register_*_hook`` returned for
    ``source`` still remove them.
    """
    target.training = source.training
    target.__dict__.update((name, source.__dict__[name]) for name in _HOOK_ATTRIBUTES if name in source.__dict__)
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
            _keep_everything_of(original, child)


class _FusedGraphModule(fx.GraphModule):
    """The GraphModule `fuse` returns: it keeps everything of the model it was traced from (see
    `_keep_everything_of`), also through copy.deepcopy and pickling, where a GraphModule would rebuild
    itself from its graph's references only."""

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str | None = None):
        super().__init__(root, graph, class_name or getattr(root, "_graphmodule_cls_name", "GraphModule"))
        _keep_everything_of(root, self)

    def _deepcopy_init(self):
        # GraphModule.__deepcopy__ calls this with a module holding a deep copy of our whole state.
        return _FusedGraphModule.__init__

    def __copy__(self):
        return _FusedGraphModule(self, self.graph)

    def __reduce__(self):
        _, arguments = super().__reduce__()
        return _rebuild_fused_graph_module, arguments


def _module_with_state(state: dict) -> nn.Module:
    module = nn.Module.__new__(nn.Module)
    module.__dict__ = state
    return module


def _rebuild_fused_graph_module(state: dict, import_block: str) -> _FusedGraphModule:
    """Unpickle a `_FusedGraphModule`: torch.fx rebuilds the graph from the saved code, and the saved
    state supplies everything else."""
    graph = fx.graph_module.reduce_graph_module(state, import_block).graph
    return _FusedGraphModule(_module_with_state(state), graph)


# ---------------------------------------------------------------------------------------------------
# Fusing in a torch.fx graph
# ---------------------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """Keeps every batch norm (plain, subclassed or already fused), every tritonbn module and every module
    with hooks a leaf.

    Tracing into a batch norm's forward would only inline torch's code (and fails on subclasses that
    branch on tensor values); batch norm subclasses are then left unfused as not exactly nn.BatchNorm*d.
    Tracing into a module with hooks would run its hooks once, on proxies: a hook that changes the output
    would be baked into the graph and one that records it would never run again.
    """

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, _BatchNorm) or type(module).__module__.startswith("tritonbn.")
                or bool(_call_hooks(module)) or super().is_leaf_module(module, qualified_name))


# Defaults torch.fx guards when it specialises on them: it asserts at run time that the value is the same.
_GUARDED_DEFAULT_TYPES = (bool, int, float, complex, str, torch.dtype, torch.device)


def _specialized_defaults(model: nn.Module) -> dict[str, object]:
    """forward's parameters that have a default value, mapped to it, to trace forward with.

    torch.fx would otherwise trace such a parameter as an unknown tensor: ``extra is None`` becomes
    False and ``isinstance(scale, float)`` False, silently fixing one branch for every call.  Traced
    with the default, the branch is the default's and a guard rejects any other value.  Raises
    TraceError (so `fuse` falls back) where that is impossible: ``*args``, ``**kwargs`` or a default
    torch.fx cannot guard (a tensor, a tuple, ...).
    """
    specialized = {}
    parameters = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1:]
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TraceError(f"forward takes {parameter}, whose contents torch.fx cannot see")
        if parameter.default is parameter.empty:
            continue
        if parameter.default is not None and type(parameter.default) not in _GUARDED_DEFAULT_TYPES:
            raise TraceError(f"forward's default {parameter} cannot be guarded by torch.fx")
        specialized[parameter.name] = parameter.default
    return specialized


def _is_default(value, default) -> bool:
    return value is default or (type(value) is type(default) and value == default)


@fx.node.has_side_effect  # a graph pass must not drop it as dead code
def check_traced_default(value, default, name: str) -> None:
    """Raise unless ``value`` is ``default``, the value of ``forward``'s parameter ``name`` that `fuse`
    traced the model with; the fused graph computes that value's branch only."""
    proxy = _first_proxy(value)
    if proxy is not None:
        proxy.tracer.create_proxy("call_function", check_traced_default, (value, default, name), {})
        return
    if _is_default(value, default):
        return
    given = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    raise ValueError(f"tritonbn.fuse traced forward with {name}={default!r} and the fused model computes only "
                     f"that case; got {name}={given}. Call the original model for other values.")


def _trace(model: nn.Module, specialized: dict[str, object]) -> fx.Graph:
    graph = _Tracer().trace(model, concrete_args=specialized or None)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in graph.find_nodes(op="placeholder"):
        name = node.target.rpartition("_")[0]
        if name in specialized and node.target == f"{name}_1":
            _guard_placeholder(graph, node, name, specialized[name], order)
    return graph


def _guard_placeholder(graph: fx.Graph, placeholder: fx.Node, name: str, default, order) -> None:
    """Put `check_traced_default` in place of the checks torch.fx added for a specialised parameter.

    torch.fx's own None check does not survive pickling (the unpickled code registers it under a name
    that breaks every later torch.fx trace in the process); forward never read the placeholder itself,
    so everything that uses it is one of those checks.
    """
    checks, pending = set(), list(placeholder.users)
    while pending:
        node = pending.pop()
        if node not in checks:
            checks.add(node)
            pending.extend(node.users)
    for node in sorted(checks, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    # Keep forward's own argument names, so that keyword calls still work; torch.fx named it "<name>_1".
    placeholder.target = name
    with graph.inserting_after(placeholder):
        graph.call_function(check_traced_default, (placeholder, default, name))


def _node_hooks(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    return _call_hooks(modules[node.target]) if node.op == "call_module" else ""


def _match_pattern(bn_node: fx.Node, modules, prefix: str
                   ) -> tuple[list[fx.Node], fx.Node | None, tuple[str, float]] | str:
    """Nodes to replace (bn, [add], [activation]), the residual and the activation; or why not.

    Modules with hooks are not fused away: the fused call would bypass them.
    """
    hooks = _node_hooks(bn_node, modules)
    if hooks:
        return _bypassed(hooks, prefix + bn_node.target)
    users = list(bn_node.users)
    if len(users) != 1:
        return f"output used by {len(users)} nodes"
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "called with more than the input"
    follower = users[0]
    activation = _node_activation(follower, modules)
    if activation is not None and follower.args[0] is bn_node:
        hooks = _node_hooks(follower, modules)
        if hooks:
            return _bypassed(hooks, prefix + follower.target)
        return [bn_node, follower], None, activation
    if follower.op == "call_function" and follower.target is fused_residual_act:
        return "output is the residual that another fused batch norm adds"
    residual = _residual_of_add(follower, bn_node)
    if residual is None:
        return f"output feeds {follower.format_node()}, not a supported activation or residual add"
    after_add = list(follower.users)
    if len(after_add) == 1:
        activation = _node_activation(after_add[0], modules)
        if activation is not None and after_add[0].args[0] is follower and not _node_hooks(after_add[0], modules):
            return [bn_node, follower, after_add[0]], residual, activation
    # The sum is used elsewhere, or not by an activation, or by an activation module whose hooks must see
    # it: fuse the add alone.
    return [bn_node, follower], residual, ("identity", _DEFAULT_SLOPE)


def _batch_norm_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) in _PLAIN_BATCH_NORMS]


def _inside(name: str, container: str) -> bool:
    return name.startswith(f"{container}.")


def _fuse_graph(model: nn.Module, report: FuseReport, prefix: str = "") -> fx.GraphModule:
    """Trace ``model`` and fuse its patterns.  The report names modules with ``prefix`` in front: the
    path of ``model`` when it is a module with hooks that `_fuse_hooked_modules` fuses on its own."""
    specialized = _specialized_defaults(model)
    traced = _FusedGraphModule(model, _trace(model, specialized), type(model).__name__)
    report.specialized = specialized
    bn_names = _batch_norm_names(model)
    if _has_legacy_backward_hook(model):
        reason = _legacy_hook_reason(prefix.removesuffix("."))
        report.unfused.update(dict.fromkeys((prefix + name for name in bn_names), reason))
        return traced
    modules = dict(traced.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) in _PLAIN_BATCH_NORMS:
            calls.setdefault(node.target, []).append(node)
    hooked = _hooked_modules(traced, modules, bn_names)
    for name in bn_names:
        if any(_inside(name, container) for container in hooked):
            continue  # `_fuse_hooked_modules` reports it
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            reason = "not called in the traced forward" if not nodes else "called at several places"
            report.unfused[prefix + name] = reason
            continue
        match = _match_pattern(nodes[0], modules, prefix)
        if isinstance(match, str):
            report.unfused[prefix + name] = match
            continue
        replaced, residual, (activation, slope) = match
        _replace_nodes(traced, replaced, residual, _fused_from_batch_norm(modules[name], activation, slope))
        report.fused.append(FusedLayer(prefix + name, activation, slope, residual is not None))
    _fuse_hooked_modules(traced, hooked, bn_names, report, prefix)
    traced.graph.lint()
    traced.recompile()
    return traced


def _hooked_modules(traced: fx.GraphModule, modules: dict[str, nn.Module], bn_names: list[str]
                    ) -> dict[str, list[fx.Node]]:
    """The graph's calls of modules with hooks that hold batch norms (the tracer kept them whole), by path.

    A module inside another one of them is left to that one: the graph holds the outer module itself,
    shared with the model, so nothing inside it may be replaced here.
    """
    hooked: dict[str, list[fx.Node]] = {}
    for node in traced.graph.find_nodes(op="call_module"):
        if _call_hooks(modules[node.target]) and any(_inside(name, node.target) for name in bn_names):
            hooked.setdefault(node.target, []).append(node)
    return {path: nodes for path, nodes in hooked.items() if not any(_inside(path, other) for other in hooked)}


def _fuse_hooked_modules(traced: fx.GraphModule, hooked: dict[str, list[fx.Node]], bn_names: list[str],
                         report: FuseReport, prefix: str) -> None:
    """Fuse inside each module with hooks as a model of its own (see `_fuse_graph`), and put the result in
    its place when it fused something.  The result carries the module's hooks (see `_keep_everything_of`),
    and its calls get and return what the module's calls did, so the hooks see the same values."""
    for path, nodes in hooked.items():
        module = traced.get_submodule(path)
        why, own_report = None, FuseReport("fx")
        if any(node.op in ("call_module", "get_attr") and _inside(node.target, path) for node in traced.graph.nodes):
            why = "forward also uses modules inside it directly"
        else:
            try:
                fused = _fuse_graph(module, own_report, f"{prefix}{path}.")
                why = _call_off_trace(nodes, module, own_report.specialized)
            except Exception as error:  # noqa: BLE001 -- as in `fuse`: any failure means "untraceable"
                why = f"torch.fx cannot trace it on its own: {type(error).__name__}: {error}"
        if why is not None:
            reason = f"inside {prefix}{path}, kept whole to run its {_call_hooks(module)}; {why}"
            report.unfused.update((prefix + name, reason) for name in bn_names if _inside(name, path))
            continue
        if own_report.fused:
            traced.add_submodule(path, fused)
        report.fused += own_report.fused
        report.unfused.update(own_report.unfused)


def _call_off_trace(nodes: list[fx.Node], module: nn.Module, specialized: dict[str, object]) -> str | None:
    """Why a call in ``nodes`` would make ``module`` fused with its ``specialized`` defaults raise (it
    passes another value for one of them), or None."""
    signature = inspect.signature(inspect.unwrap(type(module).forward))
    for node in nodes:
        passed = signature.bind(module, *node.args, **node.kwargs).arguments
        for name, default in specialized.items():
            if name in passed and not _is_default(passed[name], default):
                return f"it is called with {name}={passed[name]}, while torch.fx traces its default {default!r}"
    return None


def _replace_nodes(traced: fx.GraphModule, replaced: list[fx.Node], residual, fused: nn.Module) -> None:
    bn_node, last = replaced[0], replaced[-1]
    graph = traced.graph
    with graph.inserting_before(last):
        if residual is None:
            fused_node = graph.call_module(bn_node.target, (bn_node.args[0],))
        else:
            module = graph.get_attr(bn_node.target)
            fused_node = graph.call_function(fused_residual_act, (module, bn_node.args[0], residual))
    last.replace_all_uses_with(fused_node)
    for node in reversed(replaced):
        graph.erase_node(node)
    traced.add_submodule(bn_node.target, fused)


# ---------------------------------------------------------------------------------------------------
# The fallback for models torch.fx cannot trace
# ---------------------------------------------------------------------------------------------------

def _fusable_pair(bn: nn.Module, follower: nn.Module | None) -> tuple[str, float] | None:
    """The (activation, negative slope) when ``bn`` is a plain batch norm and ``follower`` an activation
    module, neither with hooks: then one fused call computes what calling both in turn does."""
    if type(bn) not in _PLAIN_BATCH_NORMS:
        return None
    activation = _module_activation(follower)
    if activation is None or _call_hooks(bn) or _call_hooks(follower):
        return None
    return activation


# Batch norm -> (its settings, the fused module `_fused_view` made for them).  Weak, so that a batch norm's
# entry goes with it; the entry does not refer to the batch norm itself.
_FUSED_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fused_view(bn: nn.Module, activation: str, negative_slope: float) -> nn.Module:
    """A fused module computing ``activation(bn(input))`` with ``bn``'s very parameter and buffer dicts, so
    that it follows whatever is done to them later (``.to()``, ``.double()``, new tensors assigned);
    made again when a setting of ``bn`` or the activation changes."""
    settings = (bn.training, bn.eps, bn.momentum, bn.track_running_stats, activation, negative_slope)
    cached = _FUSED_VIEWS.get(bn)
    if cached is None or cached[0] != settings:
        fused = _fused_from_batch_norm(bn, activation, negative_slope)
        vars(fused).update(_parameters=bn._parameters, _buffers=bn._buffers)
        cached = _FUSED_VIEWS[bn] = (settings, fused)
    return cached[1]


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` that computes each adjacent (batch norm, activation module) pair with one fused
    call when it is called whole: what `fuse` makes of an ``nn.Sequential`` when torch.fx cannot trace
    the model.

    It holds, indexes and iterates over the very modules it held before, so code that reads inside it
    (``seq[1](x)``, ``for m in seq``) sees plain batch norms and activations computing what they always
    did.  Its forward finds the pairs on every call, so it computes what ``nn.Sequential`` computes for
    whatever the container holds then: a pair whose batch norm or activation has hooks at that time
    runs as two plain calls.
    """

    def forward(self, input):
        modules = list(self._modules.values())
        index = 0
        while index < len(modules):
            follower = modules[index + 1] if index + 1 < len(modules) else None
            activation = _fusable_pair(modules[index], follower)
            if activation is None:
                input = modules[index](input)
                index += 1
            else:
                input = _fused_view(modules[index], *activation)(input)
                index += 2
        return input


def _fuse_sequentials(model: nn.Module, report: FuseReport) -> None:
    """Make every ``nn.Sequential`` of ``model`` that holds a pair `FusedSequential` fuses one, in place: its
    class changes, while the object, its modules and its hooks stay."""
    reasons = dict.fromkeys(_batch_norm_names(model), "not followed by an activation module inside an nn.Sequential")
    blocked = [name for name, module in model.named_modules() if _has_legacy_backward_hook(module)]
    for path, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        owner = next((name for name in blocked if name in ("", path) or _inside(path, name)), None)
        modules = list(container._modules.values())
        names = [f"{path}.{key}" if path else key for key in container._modules]
        for index, (bn, follower) in enumerate(zip(modules, modules[1:])):
            activation = _module_activation(follower)
            if type(bn) not in _PLAIN_BATCH_NORMS or activation is None:
                continue
            if type(container) not in (nn.Sequential, FusedSequential):
                # Its class's own methods would be lost with the class.
                kind = type(container).__name__
                reasons[names[index]] = f"in a {kind}; fuse leaves nn.Sequential subclasses as they are"
            elif owner is not None:
                reasons[names[index]] = _legacy_hook_reason(owner)
            elif hooks := _call_hooks(bn):
                reasons[names[index]] = _bypassed(hooks, names[index])
            elif hooks := _call_hooks(follower):
                reasons[names[index]] = _bypassed(hooks, names[index + 1])
            else:
                reasons.pop(names[index], None)
                report.fused.append(FusedLayer(names[index], *activation, False))
                container.__class__ = FusedSequential
    report.unfused.update(reasons)


# ---------------------------------------------------------------------------------------------------
# fuse
# ---------------------------------------------------------------------------------------------------

def _other_batch_norms(model: nn.Module) -> dict[str, str]:
    """Batch norms `fuse` leaves as they are whatever follows them, with the reason: subclasses of
    nn.BatchNorm*d (their forward may compute something else), nn.SyncBatchNorm, other _BatchNorm kinds."""
    fused_kinds = _fused_module_kinds()
    return {
        name: f"a {type(module).__name__}, not exactly nn.BatchNorm1d/2d/3d"
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and type(module) not in _PLAIN_BATCH_NORMS and type(module) not in fused_kinds
    }


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace batch norm + activation (+ residual add) patterns of ``model`` by fused tritonbn modules.

    Returns a ``torch.fx.GraphModule`` when torch.fx can trace ``model``, otherwise ``model`` with each
    ``nn.Sequential`` that holds a (batch norm, activation module) pair turned into a `FusedSequential`,
    which fuses the pair when called whole and still holds, indexes and iterates over the plain modules.
    The returned model's ``tritonbn_fuse_report`` attribute is a `FuseReport` listing what was fused and
    why every other batch norm was not; batch norms left unfused are the same objects.

    The GraphModule runs the traced ``forward``.  It holds every submodule, parameter, buffer and plain
    instance attribute of ``model`` -- those ``forward`` does not use too -- under the same names, in
    the same order and train/eval modes, also after copy.deepcopy and pickling: ``state_dict`` keys are
    ``model``'s.  Containers whose code the trace inlined become plain ``nn.Module`` holders, and the
    methods of ``model``'s class other than ``forward`` are not carried over: they would call
    submodules whose batch norms now apply the activation themselves.

    Parameters of ``forward`` with a default value are traced with that default, and the GraphModule
    raises a ValueError when given another value (see `FuseReport.specialized`); a ``forward``
    taking ``*args``/``**kwargs`` or a default torch.fx cannot guard takes the nn.Sequential fallback.

    Hooks (forward, forward pre-, backward and backward pre-hooks, with kwargs or always called too) run
    as in ``model``.  A batch norm with hooks stays unfused, and so does one whose activation module has
    hooks (a residual add alone is still fused into it): the fused call would bypass them.  ``model``'s
    own hooks move to the GraphModule.  A module with hooks that holds batch norms is fused as a model
    of its own, a GraphModule in its place that carries its hooks, so they see the same inputs and
    outputs; the report says why when that is impossible.  A deprecated ``register_backward_hook`` hook
    sees the gradients of its module's last operation, so nothing inside its module is fused.  Hooks
    receive the GraphModule as their module argument.  With ``inplace=True`` the GraphModule shares the
    hook dicts of the module it replaces, so the handles that registered them still remove them.
    Global hooks (``torch.nn.modules.module.register_module_forward_hook`` and the like) are left alone:
    they run for every module the fused model calls, a fused module included, and not for the
    activation modules it no longer calls.  In the fallback, a `FusedSequential` checks the hooks of a
    pair's modules whenever it is called.

    ``inplace=False`` works on a deep copy and leaves ``model`` untouched; ``inplace=True`` skips the
    copy: the result shares parameters, buffers and modules with ``model`` (so an optimizer built on
    ``model`` keeps working), and the sequential fallback rewrites ``model`` itself.

    A residual add is fused when its other operand is a tensor computed in ``forward`` (not a parameter
    or a constant).  The kernel adds it when it has the batch norm input's shape (or broadcasts to it);
    other operands take plain batch norm and torch ops at run time (see `fused_residual_act`).
    """
    if not inplace:
        model = copy.deepcopy(model)
    try:
        report = FuseReport("fx")
        result = _fuse_graph(model, report)
    except Exception as error:  # noqa: BLE001 -- tracing runs arbitrary user code; any failure means "untraceable"
        report = FuseReport("sequential", trace_error=f"{type(error).__name__}: {error}")
        _fuse_sequentials(model, report)
        result = model
    report.unfused.update(_other_batch_norms(model))
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


def _group_option(fused: nn.Module) -> dict:
    return {"process_group": fused.process_group} if hasattr(fused, "process_group") else {}


def _plain_from_fused(fused: nn.Module, plain_class: type) -> nn.Module:
    return batch_norm_like(plain_class, fused, **_group_option(fused))


def _activation_call(graph: fx.Graph, value: fx.Node, activation: str, negative_slope: float) -> fx.Node:
    if activation == "identity":
        return value
    if activation == "leaky_relu":
        return graph.call_function(F.leaky_relu, (value, negative_slope))
    return graph.call_function(_ACTIVATION_FUNCTIONS[activation], (value,))


def _fused_call(traced: fx.GraphModule, node: fx.Node, kinds) -> tuple[str, fx.Node, object] | None:
    """(module path, input, residual or None) of a node calling a fused module, else None."""
    if node.op == "call_module" and type(traced.get_submodule(node.target)) in kinds:
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        return node.target, node.args[0] if node.args else node.kwargs["input"], residual
    if node.op == "call_function" and node.target is fused_residual_act:
        module, input, residual = node.args
        return module.target, input, residual
    return None


def _unfuse_graph(traced: fx.GraphModule, kinds) -> None:
    graph = traced.graph
    plain_modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        call = _fused_call(traced, node, kinds)
        if call is None:
            continue
        target, input, residual = call
        fused = traced.get_submodule(target)
        if target not in plain_modules:
            plain_modules[target] = _plain_from_fused(fused, kinds[type(fused)][0])
        with graph.inserting_before(node):
            out = graph.call_module(target, (input,))
            if residual is not None:
                out = graph.call_function(operator.add, (out, residual))
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


def _unfuse_graph_module(traced: fx.GraphModule, kinds) -> fx.GraphModule:
    _unfuse_graph(traced, kinds)
    plain = fx.GraphModule(traced, traced.graph, type(traced).__name__)
    _keep_everything_of(traced, plain)
    return plain


def _unfuse_modules(model: nn.Module, kinds) -> nn.Module:
    """Replace fused modules outside a graph by ``BatchNormThenAct*d``, and make every `FusedSequential` an
    nn.Sequential again (it holds the plain modules)."""
    def then_activation(fused: nn.Module) -> nn.Module:
        plain = _plain_from_fused(fused, kinds[type(fused)][1])
        plain.act = activation_module(fused.activation, fused.negative_slope).train(fused.training)
        return plain

    if type(model) in kinds:
        return then_activation(model)
    for parent in list(model.modules()):
        if type(parent) is FusedSequential:
            parent.__class__ = nn.Sequential
        for key, fused in parent._modules.items():
            if type(fused) in kinds:
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
    add and activation with torch ops.  State_dict keys do not change, so checkpoints load into the
    original model.
    """
    if not inplace:
        model = copy.deepcopy(model)
    kinds = _fused_module_kinds()
    graph_modules = [name for name, module in model.named_modules() if isinstance(module, fx.GraphModule)]
    # named_modules lists a module before the modules inside it: reversed, a GraphModule's plain
    # replacement is made once those of the GraphModules inside it are in place.
    for name in reversed(graph_modules):
        plain = _unfuse_graph_module(model.get_submodule(name), kinds)
        if name:
            model.set_submodule(name, plain)
        else:
            model = plain
    # The report describes the fused model, and pickling it would need tritonbn.
    model.__dict__.pop(REPORT_ATTRIBUTE, None)
    return _unfuse_modules(model, kinds)
