"""PEFT's ``BaseTuner`` surface that ``AdaLoraModel`` inherits: ``prefix``, merging and
unloading, ``set_requires_grad``, the status reports, gradient-checkpointing preparation and
``resize_modules_by_rank_pattern``. The mixin reads ``self.model``, ``self.peft_config``,
``self.active_adapters`` and ``self.trainable_adapter_name`` of the ``AdaLoraModel``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adalora_torch._layers import iter_svd_layers
from adalora_torch._shrink import shrink_to_pattern

from ._config import AdaLoraConfig
from ._modules_to_save import wrappers
from ._serialization import module_masks
from ._status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__all__ = ["PeftSurface"]


def svd_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, Any]]:
    """``iter_svd_layers``, typed loosely: our layers carry more than the ``SVDAdapter``
    protocol (``set_adapter``, ``merge``, ``disable_adapters``, ...)."""
    return iter_svd_layers(model, adapter_name)


class PeftSurface(nn.Module):
    """Methods of PEFT's ``BaseTuner`` that ``AdaLoraModel`` shares (see the module doc)."""

    model: nn.Module
    peft_config: dict[str, AdaLoraConfig]
    active_adapters: list[str]
    trainable_adapter_name: str | None
    _adapters_disabled: bool

    prefix = "lora_"  # PEFT's prefix of AdaLoRA parameter names

    # -- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' ``ΔW`` (default: the active ones) into the base weights. Merging an
        adapter that is already merged changes nothing and warns, as PEFT does."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        layers = [layer for _, layer in svd_layers(self.model)]
        again = sorted({n for layer in layers for n in names if n in layer.merged_adapters})
        if again:
            rest = [n for n in names if n not in again]
            message = (
                f"Adapters {again} are already merged; merging {rest} in addition."
                if rest
                else f"All adapters are already merged, nothing to do ({again})."
            )
            warnings.warn(message, UserWarning, stacklevel=2)
        for layer in layers:
            layer.merge(
                safe_merge=safe_merge, adapter_names=[n for n in names if n in layer.lora_A]
            )

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for _, layer in svd_layers(self.model):
            layer.unmerge()

    merge_adapter = merge
    unmerge_adapter = unmerge

    def _unload(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None) -> nn.Module:
        if merge:
            self.merge(adapter_names=adapter_names, safe_merge=safe_merge)
        for path, layer in svd_layers(self.model):
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, layer.base_layer)
        for path, wrapper in wrappers(self.model):
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, wrapper.current())
        return self.model

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain transformers model
        (``modules_to_save`` replaced by the trained copies). ``progressbar`` is accepted for
        PEFT's signature and ignored."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Return the base model without the adapters (unmerged, adapters discarded)."""
        self.unmerge()
        return self._unload(False, False, None)

    def _adapter_switch(self, disabled: bool) -> None:
        self._adapters_disabled = disabled
        for _, layer in svd_layers(self.model):
            layer.disable_adapters = disabled
        for _, wrapper in wrappers(self.model):
            wrapper.disable_adapters = disabled

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until ``enable_adapter_layers`` (PEFT's method; the
        ``disable_adapter()`` context manager does this for a block)."""
        self._adapter_switch(True)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers``."""
        self._adapter_switch(False)

    # -- gradients ----------------------------------------------------------------------------
    def _adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(adapter name, parameter)`` for every adapter's A, E, B and ``modules_to_save``
        copies."""
        for _, layer in svd_layers(self.model):
            for kind in (layer.lora_A, layer.lora_E, layer.lora_B):
                yield from kind.items()
        for _, wrapper in wrappers(self.model):
            for adapter, copy in wrapper.modules_to_save.items():
                for param in copy.parameters():
                    yield adapter, param

    def _set_grads(self, names: set[str], requires_grad: bool, others: bool | None) -> None:
        """``requires_grad`` on the A, E, B (and ``modules_to_save`` copies) of ``names``; with
        ``others`` set, that flag on every other adapter's."""
        for adapter, param in self._adapter_parameters():
            flag = requires_grad if adapter in names else others
            if flag is not None:
                param.requires_grad_(flag)

    def set_requires_grad(
        self, adapter_names: str | Sequence[str], requires_grad: bool = True
    ) -> None:
        """Turn gradients of the given adapters' A, E, B (and ``modules_to_save`` copies) on or
        off, as PEFT. Only ``trainable_adapter_name`` gets rank allocation and the orthogonal
        penalty: another adapter made trainable here trains as plain SVD-shaped LoRA."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        unknown = sorted(names - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"Unknown adapters {unknown}; this model has {list(self.peft_config)}."
            )
        self._set_grads(names, requires_grad, None)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the input embeddings' output require grad (so checkpointed blocks see a
        gradient with a frozen base), as PEFT; quantized models are left alone."""
        if any(getattr(model, k, False) for k in ("is_loaded_in_8bit", "is_loaded_in_4bit")):
            return model
        if getattr(model, "is_quantized", False):
            return model
        target: Any = model
        if hasattr(target, "enable_input_require_grads"):
            target.enable_input_require_grads()
        elif hasattr(target, "get_input_embeddings"):

            def _require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                output.requires_grad_(True)

            target.get_input_embeddings().register_forward_hook(_require_grad)
        return model

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's ``autocast_adapter_dtype``: True keeps the adapter's weights in float32 (how
        they are created); False gives them the dtype of their base layer's weight when that is
        float16 or bfloat16 (PEFT's behaviour without autocasting)."""
        if autocast_adapter_dtype:
            return
        for _, layer in svd_layers(self.model, adapter_name):
            dtype = getattr(layer.base_layer, "weight", torch.empty(0)).dtype
            if dtype not in (torch.float16, torch.bfloat16):
                continue
            for kind in (layer.lora_A, layer.lora_E, layer.lora_B, layer.ranknum):
                kind[adapter_name].data = kind[adapter_name].data.to(dtype)

    # -- reports ------------------------------------------------------------------------------
    def get_layer_status(self) -> list[TunerLayerStatus]:
        """PEFT's per-layer status (``adalora_hf.get_layer_status``)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """PEFT's model status (``adalora_hf.get_model_status``)."""
        return get_model_status(self)

    # -- shrinking ----------------------------------------------------------------------------
    def resize_modules_by_rank_pattern(
        self, rank_pattern: Mapping[str, Sequence[bool] | torch.Tensor], adapter_name: str
    ) -> None:
        """Keep only the triplets ``rank_pattern`` marks True in each named module of an
        inference adapter (PEFT's method; keys ``<module>.lora_E[.<adapter>]``). The adapter
        that trains is refused: its allocator holds per-triplet state, shrink it with
        ``adalora_torch.shrink_to_pattern`` after its final allocation instead."""
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"No adapter {adapter_name!r}; this model has {list(self.peft_config)}."
            )
        if adapter_name == self.trainable_adapter_name:
            raise ValueError(
                f"Adapter {adapter_name!r} trains with a rank allocator: resizing it would break "
                "the allocator's state. Use adalora_torch.shrink_to_pattern after the final "
                "allocation, or resize an adapter loaded with is_trainable=False."
            )
        plain = {
            k: (v.reshape(-1).tolist() if isinstance(v, torch.Tensor) else list(v))
            for k, v in rank_pattern.items()
        }
        masks = module_masks(plain, adapter_name)
        for path, layer in svd_layers(self.model, adapter_name):  # unnamed modules keep all
            masks.setdefault(path, [True] * int(layer.lora_E[adapter_name].shape[0]))
        shrink_to_pattern(self.model, adapter_name=adapter_name, rank_pattern=masks)
