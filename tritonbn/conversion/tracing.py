"""Tracing a model for `fuse`: which modules stay whole in the graph, and ``forward``'s defaults.

torch.fx traces ``forward`` with proxies for its arguments.  A parameter with a default value is traced
at that value instead, and the graph checks at run time that each call passes it (`check_traced_default`).
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import TraceError
from torch.nn.modules.batchnorm import _BatchNorm

from .fused_graph import check_traced_default
from .fused_sequential import FusedSequential
from .hooks import call_hooks


class _Tracer(fx.Tracer):
    """Keeps every batch norm (plain, subclassed or already fused), every `FusedSequential` and every module
    with hooks a leaf; other modules are traced through as torch.fx does, those defined in tritonbn included.

    Tracing into a batch norm's forward would only inline its implementation (and fails on subclasses that
    branch on tensor values); batch norm subclasses are then left unfused as not exactly nn.BatchNorm*d.
    A FusedSequential's forward calls fused modules it makes on the fly, which are no submodules a graph
    could call.  Tracing into a module with hooks would run its hooks once, on proxies: a hook that changes
    the output would be baked into the graph and one that records it would never run again.
    """

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (_BatchNorm, FusedSequential)) or bool(call_hooks(module))
                or super().is_leaf_module(module, qualified_name))


# Defaults torch.fx guards when it specialises on them: it asserts at run time that the value is the same.
_GUARDED_DEFAULT_TYPES = (bool, int, float, complex, str, torch.dtype, torch.device)


def specialized_defaults(model: nn.Module) -> dict[str, object]:
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


def trace(model: nn.Module, specialized: dict[str, object]) -> fx.Graph:
    """The graph of ``model.forward``, with the parameters in ``specialized`` (see `specialized_defaults`)
    traced at their defaults and checked by `check_traced_default`."""
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
