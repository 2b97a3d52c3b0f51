"""``forward`` of a wrapper that reports the wrapped model's signature to ``inspect``.

``transformers.Trainer`` keeps only the batch columns named in ``inspect.signature(model.forward)``
(``remove_unused_columns=True``, the default). A wrapper's ``forward(*args, **kwargs)`` names
none, so every input column would be dropped. The descriptor below gives each instance a
``forward`` whose ``__signature__`` is the wrapped model's, without touching the class-level
function, so copies and pickles of the wrapper stay plain modules.

On the class, ``forward`` reports ``(self, *args, labels=None, **kwargs)``: ``Trainer`` finds
the label columns with ``find_labels(type(model))`` (PEFT models are unwrapped first, ours are
not), and a class-level signature without ``labels`` gives ``label_names == []``, so
``evaluate()`` would report no ``eval_loss``. ``labels`` is the name transformers' models use
(question answering, with ``start_positions``/``end_positions``, needs
``TrainingArguments(label_names=[...])``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["ForwardWithSignature"]


@functools.lru_cache(maxsize=64)
def _method_signature(func: Callable[..., Any]) -> inspect.Signature | None:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1:]  # drop ``self``
    return sig.replace(parameters=params)


def signature_of(forward: Callable[..., Any]) -> inspect.Signature | None:
    """The signature of a (bound) ``forward``, cached per underlying function."""
    func = getattr(forward, "__func__", None)
    if func is not None:
        return _method_signature(func)
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


class ForwardWithSignature:
    """Class attribute wrapping ``impl(self, *args, **kwargs)``; on an instance it returns a
    function whose ``__signature__`` is ``inspect.signature(instance.wrapped_forward())``."""

    def __init__(self, impl: Callable[..., Any]) -> None:
        self.impl = impl
        functools.update_wrapper(self, impl)  # type: ignore[arg-type]
        params = [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
        impl.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]

    def __get__(self, obj: Any, objtype: type | None = None) -> Callable[..., Any]:
        impl = self.impl
        if obj is None:
            return impl

        def forward(*args: Any, **kwargs: Any) -> Any:
            return impl(obj, *args, **kwargs)

        sig = signature_of(obj.wrapped_forward())
        if sig is not None:
            forward.__signature__ = sig  # type: ignore[attr-defined]
        forward.__doc__ = impl.__doc__
        return forward
