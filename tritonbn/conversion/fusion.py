"""`fuse`: convert a model's batch norm + activation (+ residual add) patterns to fused tritonbn modules.

`fuse` traces the model with torch.fx (`tracing`) and rewrites every ``nn.BatchNorm{1,2,3}d`` whose output
feeds only an activation -- optionally through a residual add first, ``act(bn(x) + identity)`` -- into one
``BatchNormAct{1,2,3}d`` call (`fx_patterns` finds them).  The fused module is registered under the batch
norm's own name and shares its parameters and buffers.  The result, a `FusedGraphModule`, keeps every
submodule, parameter, buffer and plain attribute of the model, in order and in the same train/eval mode, so
``state_dict`` keys are unchanged and checkpoints load either way.  Hooks keep running (see `fuse`): a batch
norm or activation module with hooks stays unfused, and a module with hooks is fused as a model of its own
that carries them.  Models that torch.fx cannot trace fall back to `FusedSequential`: ``nn.Sequential``
containers that fuse their (batch norm, activation) pairs when called whole and still hold the plain modules.

Every call returns a model carrying a `FuseReport` as ``model.tritonbn_fuse_report`` and logs it.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..modules import FUSED_CLASS_OF, fused_like
from .fused_graph import UNFUSED_CLASS_OF, FusedGraphModule, fused_residual_act, is_default
from .fused_sequential import FusedSequential
from .fx_patterns import match_pattern, module_activation, norm_act_activation
from .hooks import bypassed, call_hooks, has_legacy_backward_hook, legacy_hook_reason
from .timm_layers import fused_norm_act, is_timm_norm_act
from .tracing import specialized_defaults, trace

logger = logging.getLogger(__name__)

REPORT_ATTRIBUTE = "tritonbn_fuse_report"


@dataclass
class FusedLayer:
    """One batch norm that `fuse` replaced: its qualified name, the activation and the residual add."""

    name: str
    activation: str
    negative_slope: float
    residual: bool


@dataclass
class FuseReport:
    """What `fuse` did: ``method`` is "fx", "sequential" (the `FusedSequential` fallback for untraceable
    models) or "module" (the model was one of timm's batch norm + activation modules), ``fused`` lists the
    replaced batch norms, ``unfused`` maps every other batch norm to the reason.

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
# fuse
# ---------------------------------------------------------------------------------------------------

def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose synchronized batch norms share the originals' process groups: a group
    is a handle on the ranks' communicator, which cannot be copied (copy.deepcopy raises)."""
    groups = {id(group): group for module in model.modules()
              if (group := getattr(module, "process_group", None)) is not None}
    return copy.deepcopy(model, memo=groups)


def _other_batch_norms(model: nn.Module) -> dict[str, str]:
    """Batch norms `fuse` leaves as they are whatever follows them, with the reason: subclasses of
    nn.BatchNorm*d (their forward may compute something else) other than timm's batch norm + activation
    modules, nn.SyncBatchNorm, other _BatchNorm kinds."""
    known = {*FUSED_CLASS_OF, *UNFUSED_CLASS_OF}  # the batch norms fuse replaces, and the fused ones
    return {
        name: f"a {type(module).__name__}, not exactly nn.BatchNorm1d/2d/3d"
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and type(module) not in known and not is_timm_norm_act(module)
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

    ``inplace=False`` works on a deep copy (sharing process groups) and leaves ``model`` untouched;
    ``inplace=True`` skips the copy: the result shares parameters, buffers and modules with ``model`` (so
    an optimizer built on ``model`` keeps working), and the sequential fallback rewrites ``model`` itself.

    A residual add is fused when its other operand is a tensor computed in ``forward`` (not a parameter
    or a constant).  The kernel adds it when it has the batch norm input's shape (or broadcasts to it);
    other operands take plain batch norm and torch ops at run time (see `fused_residual_act`).

    timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` (see `timm_layers`) whose ``drop`` is an identity and
    whose ``act`` is an activation the kernels compute (or an identity) are replaced by tritonbn's
    BatchNormAct2d or SyncBatchNormAct, in the graph or in the fallback, sharing their state; one without
    an activation is also fused with the activation or residual add that follows it, as nn.BatchNorm2d
    is.  ``fuse`` of such a module alone returns its fused module.  The others stay, with the reason.
    """
    if not inplace:
        model = copy_model(model)
    try:
        if is_timm_norm_act(model):  # nothing to trace: the fused module takes its place
            report = FuseReport("module")
            result = _fuse_norm_acts(model, report)
        else:
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
# Fusing in a torch.fx graph
# ---------------------------------------------------------------------------------------------------

def _batch_norm_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) in FUSED_CLASS_OF]


def _norm_act_names(model: nn.Module) -> list[str]:
    """The paths of timm's batch norm + activation modules in ``model``."""
    return [name for name, module in model.named_modules() if is_timm_norm_act(module)]


def _inside(name: str, container: str) -> bool:
    return name.startswith(f"{container}.")


def _fuse_graph(model: nn.Module, report: FuseReport, prefix: str = "") -> fx.GraphModule:
    """Trace ``model`` and fuse its patterns.  The report names modules with ``prefix`` in front: the
    path of ``model`` when it is a module with hooks that `_fuse_hooked_modules` fuses on its own."""
    specialized = specialized_defaults(model)
    traced = FusedGraphModule(model, trace(model, specialized), type(model).__name__)
    report.specialized = specialized
    bn_names = _batch_norm_names(model) + _norm_act_names(model)
    if has_legacy_backward_hook(model):
        reason = legacy_hook_reason(prefix.removesuffix("."))
        report.unfused.update(dict.fromkeys((prefix + name for name in bn_names), reason))
        return traced
    modules = dict(traced.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    fusable = set(bn_names)
    for node in traced.graph.nodes:
        if node.op == "call_module" and node.target in fusable:
            calls.setdefault(node.target, []).append(node)
    hooked = _hooked_modules(traced, modules, bn_names)
    for name in bn_names:
        if any(_inside(name, container) for container in hooked):
            continue  # `_fuse_hooked_modules` reports it
        fuse_one = _fuse_norm_act if is_timm_norm_act(modules[name]) else _fuse_batch_norm
        outcome = fuse_one(traced, modules, name, calls.get(name, []), prefix)
        if isinstance(outcome, str):
            report.unfused[prefix + name] = outcome
        else:
            report.fused.append(outcome)
    _fuse_hooked_modules(traced, hooked, bn_names, report, prefix)
    traced.graph.lint()
    traced.recompile()
    return traced


def _fuse_batch_norm(traced: fx.GraphModule, modules: dict[str, nn.Module], name: str, nodes: list[fx.Node],
                     prefix: str) -> FusedLayer | str:
    """Fuse nn.BatchNorm*d ``name``, called at ``nodes``, with the activation and residual add that follow it;
    what was fused, or why nothing was."""
    if len(nodes) != 1:
        return "not called in the traced forward" if not nodes else "called at several places"
    match = match_pattern(nodes[0], modules, prefix)
    if isinstance(match, str):
        return match
    return _fuse_match(traced, match, fused_like, modules[name], prefix + name)


def _fuse_norm_act(traced: fx.GraphModule, modules: dict[str, nn.Module], name: str, nodes: list[fx.Node],
                   prefix: str) -> FusedLayer | str:
    """Fuse timm's batch norm + activation ``name``, called at ``nodes``: a fused module computes what it
    does, so it takes the module's place however often it is called and whatever its output feeds.  One
    without an activation (``apply_act=False``) called once is first fused with the activation or residual
    add that follows it, as nn.BatchNorm2d is."""
    module = modules[name]
    own = norm_act_activation(module, prefix + name)
    if isinstance(own, str):
        return own
    if not nodes:
        return "not called in the traced forward"
    if own[0] == "identity" and len(nodes) == 1:
        match = match_pattern(nodes[0], modules, prefix)
        if not isinstance(match, str):
            return _fuse_match(traced, match, fused_norm_act, module, prefix + name)
    traced.add_submodule(name, fused_norm_act(module, *own))
    return FusedLayer(prefix + name, *own, False)


def _fuse_match(traced: fx.GraphModule, match, make_fused, bn: nn.Module, qualified_name: str) -> FusedLayer:
    """Replace the nodes of a `match_pattern` match by one call of ``make_fused(bn, activation, slope)``."""
    replaced, residual, (activation, slope) = match
    _replace_nodes(traced, replaced, residual, make_fused(bn, activation, slope))
    return FusedLayer(qualified_name, activation, slope, residual is not None)


def _hooked_modules(traced: fx.GraphModule, modules: dict[str, nn.Module], bn_names: list[str]
                    ) -> dict[str, list[fx.Node]]:
    """The graph's calls of modules with hooks that hold batch norms (the tracer kept them whole), by path.

    A module inside another one of them is left to that one: the graph holds the outer module itself,
    shared with the model, so nothing inside it may be replaced here.
    """
    hooked: dict[str, list[fx.Node]] = {}
    for node in traced.graph.find_nodes(op="call_module"):
        if call_hooks(modules[node.target]) and any(_inside(name, node.target) for name in bn_names):
            hooked.setdefault(node.target, []).append(node)
    return {path: nodes for path, nodes in hooked.items() if not any(_inside(path, other) for other in hooked)}


def _fuse_hooked_modules(traced: fx.GraphModule, hooked: dict[str, list[fx.Node]], bn_names: list[str],
                         report: FuseReport, prefix: str) -> None:
    """Fuse inside each module with hooks as a model of its own (see `_fuse_graph`), and put the result in
    its place when it fused something.  The result carries the module's hooks (see `keep_everything_of`),
    and its calls get and return what the module's calls did, so the hooks see the same values."""
    for path, nodes in hooked.items():
        module = traced.get_submodule(path)
        why, own_report = None, FuseReport("fx")
        if any(node.op in ("call_module", "get_attr") and _inside(node.target, path) for node in traced.graph.nodes):
            why = "forward also uses modules inside it directly"
        else:
            try:
                fused = _fuse_graph(module, own_report, f"{prefix}{path}.")
                why = _call_offtrace(nodes, module, own_report.specialized)
            except Exception as error:  # noqa: BLE001 -- as in `fuse`: any failure means "untraceable"
                why = f"torch.fx cannot trace it on its own: {type(error).__name__}: {error}"
        if why is not None:
            reason = f"inside {prefix}{path}, kept whole to run its {call_hooks(module)}; {why}"
            report.unfused.update((prefix + name, reason) for name in bn_names if _inside(name, path))
            continue
        if own_report.fused:
            traced.add_submodule(path, fused)
        report.fused += own_report.fused
        report.unfused.update(own_report.unfused)


def _call_offtrace(nodes: list[fx.Node], module: nn.Module, specialized: dict[str, object]) -> str | None:
    """Why a call in ``nodes`` would make ``module`` fused with its ``specialized`` defaults raise (it
    passes another value for one of them), or None."""
    signature = inspect.signature(inspect.unwrap(type(module).forward))
    for node in nodes:
        passed = signature.bind(module, *node.args, **node.kwargs).arguments
        for name, default in specialized.items():
            if name in passed and not is_default(passed[name], default):
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

def _legacy_hook_owners(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if has_legacy_backward_hook(module)]


def _owner(path: str, owners: list[str]) -> str | None:
    """The module of ``owners`` that is or holds module ``path``, if any."""
    return next((name for name in owners if name in ("", path) or _inside(path, name)), None)


def _fuse_sequentials(model: nn.Module, report: FuseReport) -> None:
    """Make every ``nn.Sequential`` of ``model`` that holds a pair `FusedSequential` fuses one, in place: its
    class changes, while the object, its modules and its hooks stay.  timm's batch norm + activation modules
    are replaced wherever they are (`_fuse_norm_acts`)."""
    reasons = dict.fromkeys(_batch_norm_names(model), "not followed by an activation module inside an nn.Sequential")
    blocked = _legacy_hook_owners(model)
    for path, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        owner = _owner(path, blocked)
        modules = list(container._modules.values())
        names = [f"{path}.{key}" if path else key for key in container._modules]
        for index, (bn, follower) in enumerate(zip(modules, modules[1:])):
            activation = module_activation(follower)
            if type(bn) not in FUSED_CLASS_OF or activation is None:
                continue
            if type(container) not in (nn.Sequential, FusedSequential):
                # Its class's own methods would be lost with the class.
                kind = type(container).__name__
                reasons[names[index]] = f"in a {kind}; fuse leaves nn.Sequential subclasses as they are"
            elif owner is not None:
                reasons[names[index]] = legacy_hook_reason(owner)
            elif hooks := call_hooks(bn):
                reasons[names[index]] = bypassed(hooks, names[index])
            elif hooks := call_hooks(follower):
                reasons[names[index]] = bypassed(hooks, names[index + 1])
            else:
                reasons.pop(names[index], None)
                report.fused.append(FusedLayer(names[index], *activation, False))
                container.__class__ = FusedSequential
    report.unfused.update(reasons)
    _fuse_norm_acts(model, report)


def _fuse_norm_acts(model: nn.Module, report: FuseReport) -> nn.Module:
    """Put a fused module in the place of each of timm's batch norm + activation modules in ``model`` that
    one fused module computes, in place, without tracing: each computes what the module it replaces
    computes, wherever that is called.  Returns ``model``, or the fused module when ``model`` is timm's."""
    blocked = _legacy_hook_owners(model)
    for path in _norm_act_names(model):
        module = model.get_submodule(path)
        owner = _owner(path, blocked)
        own = legacy_hook_reason(owner) if owner is not None else norm_act_activation(module, path)
        if isinstance(own, str):
            report.unfused[path] = own
            continue
        report.fused.append(FusedLayer(path, *own, False))
        if not path:
            return fused_norm_act(module, *own)
        model.set_submodule(path, fused_norm_act(module, *own))
    return model

