"""Replacing a module's forward in place, and knowing when that is safe.

The fused backend changes no module's class but the adapted layers': SwiGLU MLPs, RMSNorms and
the model itself (for the loss) get an instance-level ``forward`` (:func:`wrap_forward`) that
:func:`unwrap_forward` removes again. Which modules may be wrapped is decided by their source:
transformers copies such modules verbatim across model files, so :func:`forward_contains` finds
the exact lines the fused forward replaces.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn


@functools.cache
def forward_contains(cls: type, code: str) -> bool:
    """True when ``cls.forward``'s source, whitespace removed, contains ``code``: transformers
    copies such modules verbatim across model files ("Copied from"), so matching the source is
    how the fused path knows that replacing the forward changes nothing but speed."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return code in "".join(source.split())


class WrappedForward:
    """``module.forward`` replaced by ``impl(module, ...)``, showing the original's signature.

    The signature matters: transformers' Trainer reads ``inspect.signature(model.forward)`` to
    decide which dataset columns to keep and whether to pass ``num_items_in_batch``. A plain
    object (not a closure) so that ``copy.deepcopy(model)`` rebinds it to the copy.
    """

    def __init__(self, module: nn.Module, impl: Callable, original: Callable) -> None:
        self.module, self.impl, self.original = module, impl, original

    def __call__(self, *args, **kwargs):
        return self.impl(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original)


def wrap_forward(module: nn.Module, forward: Callable) -> None:
    """Give ``module`` an instance-level forward, keeping the one it had to restore later."""
    if "_peftlab_unfused_forward" not in module.__dict__:
        module._peftlab_unfused_forward = module.forward
        module.forward = WrappedForward(module, forward, module.forward)


def unwrap_forward(module: nn.Module) -> None:
    """Undo :func:`wrap_forward` (nothing to do where it never ran)."""
    original = module.__dict__.pop("_peftlab_unfused_forward", None)
    if original is None:
        return
    if getattr(original, "__func__", None) is type(module).forward:
        module.__dict__.pop("forward", None)  # back to the class's own method
    else:
        module.forward = original  # someone else's wrapper was there first: restore it


def is_wrapped(module: nn.Module) -> bool:
    """True while :func:`wrap_forward`'s forward is installed on ``module``."""
    return "_peftlab_unfused_forward" in module.__dict__


def unfused_forward(module: nn.Module) -> Callable:
    """The forward ``module`` had before :func:`wrap_forward`: what a fused forward falls back to."""
    return module._peftlab_unfused_forward


__all__ = ["forward_contains", "WrappedForward", "wrap_forward", "unwrap_forward", "is_wrapped",
           "unfused_forward"]
