"""What `fuse` recognises: activations, and batch norm -> [residual add] -> activation in a torch.fx graph.

An activation is an nn module, a functional form or a tensor method that the registry
(``activations.REGISTRY``) lists, or one of timm's own activation modules that computes one of them, with
settings the kernels compute (an ELU with alpha 1, exact GELU).  timm's batch norm + activation modules hold
one (`norm_act_activation`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..activations import DEFAULT_SLOPE, REGISTRY, Activation
from .fused_graph import fused_residual_act
from .hooks import bypassed, call_hooks
from .timm_layers import timm_activation, unlike_timm

_BY_MODULE = {activation.module: activation for activation in REGISTRY.values()}
_BY_FUNCTION = {function: activation for activation in REGISTRY.values() for function in activation.functions}
_BY_METHOD = {method: activation for activation in REGISTRY.values() for method in activation.methods}


def _with_settings(activation: Activation | None, get) -> tuple[str, float] | None:
    """(name, negative slope) when the settings ``get`` reads are ones the kernels compute, else None."""
    if activation is None:
        return None
    slope = activation.settings(get)
    return None if slope is None else (activation.name, slope)


def module_activation(module: nn.Module | None) -> tuple[str, float] | None:
    """(activation name, negative slope) of an activation module the kernels implement, else None.

    The module's class must be exactly the registry's (or timm's, see `timm_activation`): a subclass may
    compute something else."""
    activation = _BY_MODULE.get(type(module)) or REGISTRY.get(timm_activation(module))
    return _with_settings(activation, lambda position, name, default: getattr(module, name, default))


def norm_act_activation(module: nn.Module, name: str) -> tuple[str, float] | str:
    """(activation name, negative slope) that one fused module computes timm's batch norm + activation
    ``module`` (named ``name``) with, or why it does not: its structure is not timm's, its ``drop`` is not an
    identity, its ``act`` is not an activation the kernels compute, or it, its ``drop`` or its ``act`` has
    hooks, which a fused call would bypass."""
    differs = unlike_timm(module)
    if differs is not None:
        return f"a {type(module).__qualname__} from {type(module).__module__}, but {differs}"
    drop, act = module._modules.get("drop"), module._modules.get("act")
    if drop is not None and type(drop) is not nn.Identity:
        return f"its drop layer {name}.drop is a {type(drop).__name__}, not an identity"
    activation = ("identity", DEFAULT_SLOPE) if act is None else module_activation(act)
    if activation is None:
        return f"its activation {name}.act, {act}, is not one tritonbn fuses"
    for path, part in ((name, module), (f"{name}.drop", drop), (f"{name}.act", act)):
        hooks = call_hooks(part) if part is not None else ""
        if hooks:
            return bypassed(hooks, path)
    return activation


def node_activation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, float] | None:
    """(activation name, negative slope) of a graph node applying an activation to its first argument
    (module call, function or tensor method), else None."""
    if node.op == "call_module":
        return module_activation(modules[node.target])
    if node.op == "call_function":
        activation = _BY_FUNCTION.get(node.target)
    elif node.op == "call_method":
        activation = _BY_METHOD.get(node.target)
    else:
        return None

    def argument(position: int, name: str, default):
        return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)

    return _with_settings(activation, argument)


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


def _node_hooks(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    return call_hooks(modules[node.target]) if node.op == "call_module" else ""


def match_pattern(bn_node: fx.Node, modules: dict[str, nn.Module], prefix: str
                  ) -> tuple[list[fx.Node], fx.Node | None, tuple[str, float]] | str:
    """Nodes to replace (bn, [add], [activation]), the residual and the activation; or why not.

    Modules with hooks are not fused away: the fused call would bypass them.  ``prefix`` goes in front
    of module names in the reasons.
    """
    hooks = _node_hooks(bn_node, modules)
    if hooks:
        return bypassed(hooks, prefix + bn_node.target)
    users = list(bn_node.users)
    if len(users) != 1:
        return f"output used by {len(users)} nodes"
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "called with more than the input"
    follower = users[0]
    activation = node_activation(follower, modules)
    if activation is not None and follower.args[0] is bn_node:
        hooks = _node_hooks(follower, modules)
        if hooks:
            return bypassed(hooks, prefix + follower.target)
        return [bn_node, follower], None, activation
    if follower.op == "call_function" and follower.target is fused_residual_act:
        return "output is the residual that another fused batch norm adds"
    residual = _residual_of_add(follower, bn_node)
    if residual is None:
        return f"output feeds {follower.format_node()}, not a supported activation or residual add"
    after_add = list(follower.users)
    if len(after_add) == 1:
        activation = node_activation(after_add[0], modules)
        if activation is not None and after_add[0].args[0] is follower and not _node_hooks(after_add[0], modules):
            return [bn_node, follower, after_add[0]], residual, activation
    # The sum is used elsewhere, or not by an activation, or by an activation module whose hooks must see
    # it: fuse the add alone.
    return [bn_node, follower], residual, ("identity", DEFAULT_SLOPE)
