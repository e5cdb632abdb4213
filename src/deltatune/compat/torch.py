"""What deltatune assumes about torch's private module state.

The fused paths run a layer's weight through their own function instead of calling the layer, which is
only exact when calling it would do nothing more than its class's ``forward``. Whether a hook would run
is read from ``nn.Module``'s private hook dicts (per module, and the global ones in
``torch.nn.modules.module``); ``tests/test_compat.py`` checks each still exists and still fills when a
hook is registered.
"""

from __future__ import annotations

from torch import nn

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward``: hooks (its own or global), or a patched
    forward."""
    return (
        any(getattr(module, name) for name in _MODULE_HOOKS)
        or "forward" in vars(module)
        or any(getattr(nn.modules.module, name) for name in _GLOBAL_HOOKS)
    )
