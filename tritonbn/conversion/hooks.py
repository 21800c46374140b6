"""Reading a module's own hooks, for `fuse`: which ones a fused call would bypass, and how to say so.

Global hooks (``register_module_forward_hook`` and the like) are not a module's own and are not read here.
"""

from torch import nn

# The hooks nn.Module.__call__ runs around forward, and what to call them in a report.  The other call
# hook dicts (_forward_hooks_with_kwargs, _forward_hooks_always_called, ...) only flag entries of these.
_CALL_HOOKS = {
    "_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook",
}

# Every attribute a module's own hooks live in.  A GraphModule starts with none of its root's hooks.
HOOK_ATTRIBUTES = (
    *_CALL_HOOKS, "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_is_full_backward_hook", "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def call_hooks(module: nn.Module) -> str:
    """The kinds of hooks ``module.__call__`` runs for ``module`` ("forward hook and backward hook"), or ""."""
    return " and ".join(kind for attribute, kind in _CALL_HOOKS.items() if module.__dict__.get(attribute))


def bypassed(hooks: str, name: str) -> str:
    """Why a batch norm stays unfused: ``hooks`` (from `call_hooks`) on module ``name``."""
    return f"{hooks} on {name}, which a fused call would bypass"


def has_legacy_backward_hook(module: nn.Module) -> bool:
    """Whether ``module`` has a hook from the deprecated ``register_backward_hook``: it gets the gradients
    of the last operation ``module`` ran, which fusing anything inside ``module`` may change."""
    return bool(module.__dict__.get("_backward_hooks")) and module.__dict__.get("_is_full_backward_hook") is False


def legacy_hook_reason(name: str) -> str:
    """Why the batch norms inside module ``name`` ("" for the model) with such a hook stay unfused."""
    owner = name or "the model"
    return (f"{owner} has a backward hook from register_backward_hook, which sees the gradients of {owner}'s "
            "last operation; fusing inside it could change them")
