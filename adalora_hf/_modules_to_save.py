"""Trainable copies of whole modules (classification heads), one per adapter.

The wrapper keeps PEFT's attribute names, so parameter names line up with PEFT's:
``<module>.original_module.<param>`` (frozen) and ``<module>.modules_to_save.<adapter>.<param>``
(the trained copy). ``adalora_hf._serialization`` says how the copy is stored on disk.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["ModulesToSaveWrapper", "wrap_modules_to_save", "wrappers"]


class ModulesToSaveWrapper(nn.Module):
    """Run the active adapter's copy of ``module`` (or the original when none is active)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        module.requires_grad_(False)

    def add_adapter(self, adapter_name: str, trainable: bool) -> None:
        """Add a copy of the original module for ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(trainable)

    def set_adapter(self, adapter_name: str | None) -> None:
        """Use ``adapter_name``'s copy; None (or an adapter without one) uses the original."""
        known = adapter_name is not None and adapter_name in self.modules_to_save
        self.active_adapter = adapter_name if known else None

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s copy."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def current(self) -> nn.Module:
        """The module that runs now."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through ``current()``."""
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current(), name)


def wrappers(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    """``(name, wrapper)`` for every ``ModulesToSaveWrapper`` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def wrap_modules_to_save(
    model: nn.Module, adapter_name: str, names: list[str], *, trainable: bool, activate: bool
) -> None:
    """Give ``adapter_name`` a copy of each module in ``names`` (wrapping it first unless it
    already is a wrapper), trainable or frozen; ``activate``: make the copies run."""
    existing = dict(wrappers(model))
    for name in names:
        wrapper = existing.get(name)
        if wrapper is None:
            parent, _, child = name.rpartition(".")
            wrapper = ModulesToSaveWrapper(model.get_submodule(name))
            setattr(model.get_submodule(parent), child, wrapper)
        wrapper.add_adapter(adapter_name, trainable)
        if activate:
            wrapper.set_adapter(adapter_name)
