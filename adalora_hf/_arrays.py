"""Save an adapter trained outside torch (JAX, NumPy, ...) in PEFT's file format.

The caller holds one ``(A, E, B)`` triplet of arrays per adapted module, named as the module
is named in the torch model that will load it, and the keep-masks of the rank allocator
(``adalora_core``'s ``state.masks``). ``save_adapter_arrays`` writes what
``AdaLoraModel.save_pretrained`` writes for the same adapter: the tensors shrunk by the rank
pattern under PEFT's key names, and ``adapter_config.json`` with the ``rank_pattern``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from adalora_core import as_triplet
from adalora_torch._inject import name_matches

from ._config import AdaLoraConfig
from ._io import write_files_atomic
from ._serialization import (
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    module_masks,
    pattern_key,
    shrink_state_dict,
    weights_bytes,
)

__all__ = ["save_adapter_arrays"]


def _checked_triplet(module: str, triplet: Sequence[object], init_r: int) -> list[np.ndarray]:
    what = f"arrays[{module!r}]"
    a, e, b = as_triplet(triplet, what)  # floating, shapes of one rank: the core's rule
    for x, part in zip((a, e, b), "AEB"):
        if not np.isfinite(x).all():
            raise ValueError(
                f"{what}.{part} holds NaN or inf: the adapter diverged; save it from a finite step."
            )
    r = a.shape[0]
    if r != init_r:
        raise ValueError(
            f"{what} has rank {r} but config.init_r is {init_r}: pass the arrays at "
            "their full rank (the masks shrink them) and the config they were trained with."
        )
    return [a, e.reshape(r, 1), b]


def _checked_masks(
    masks: Mapping[str, Sequence[bool]] | None,
    config: AdaLoraConfig,
    modules: Sequence[str],
) -> dict[str, list[bool]]:
    if masks is None:
        masks = module_masks(config.rank_pattern, "default")
    elif config.rank_pattern:
        raise ValueError(
            "Pass the keep-masks either as masks= or in config.rank_pattern, not both."
        )
    out = {}
    for module, keep in masks.items():
        array = np.asarray(keep)
        if array.dtype != bool:
            raise ValueError(
                f"The keep-mask of {module!r} has dtype {array.dtype}: pass bools "
                "(True = triplet kept), e.g. adalora_core's state.masks."
            )
        out[module] = [bool(b) for b in array.reshape(-1)]
    unknown = sorted(set(out) - set(modules))
    if unknown:
        raise ValueError(f"The rank pattern names modules that have no arrays: {unknown[:5]}.")
    for module, kept in out.items():
        if len(kept) != config.init_r:
            raise ValueError(
                f"The rank pattern of {module!r} has {len(kept)} entries but config.init_r is "
                f"{config.init_r}: the masks belong to another init_r or model."
            )
    return out


def save_adapter_arrays(
    directory: str | os.PathLike[str],
    arrays: Mapping[str, Sequence[object]],
    *,
    config: AdaLoraConfig,
    masks: Mapping[str, Sequence[bool]] | None = None,
) -> None:
    """Write an adapter held as arrays into ``directory`` in PEFT's format.

    ``arrays`` maps each adapted module's name in the torch model (``"fc1"``,
    ``"encoder.layer.0.attention.self.query"``) to its ``(A, E, B)``: NumPy arrays or anything
    ``np.asarray`` reads (JAX arrays), A ``(init_r, in_features)``, E ``(init_r,)`` or
    ``(init_r, 1)``, B ``(out_features, init_r)``, floating and finite. ``masks`` maps module
    names to their keep-masks (``init_r`` bools, e.g. ``adalora_core``'s ``state.masks``); a
    module without one keeps every triplet. Masks can come in ``config.rank_pattern`` instead
    (either key form), not both. ``config`` gives ``init_r``, ``lora_alpha`` and the
    ``target_modules``, which must match every module name.

    Writes ``adapter_model.safetensors`` (float32 tensors ``base_model.model.<module>.lora_A``,
    ``.lora_E``, ``.lora_B``, shrunk to the kept triplets) and ``adapter_config.json`` (with
    the ``rank_pattern`` and ``inference_mode=True``), crash-safely as ``save_pretrained``
    does; ``adalora_hf.AdaLoraModel.from_pretrained`` and ``peft.PeftModel.from_pretrained``
    load them onto the torch model (PEFT also needs ``config.total_step``). Raises
    ``ValueError`` before writing anything when the arrays or masks are inconsistent (shapes,
    ranks, dtypes, unknown modules, non-finite values).
    """
    if not isinstance(config, AdaLoraConfig):
        raise ValueError(f"config must be an adalora_hf.AdaLoraConfig, got {type(config)}.")
    if not arrays:
        raise ValueError("arrays is empty: pass one (A, E, B) per adapted module.")
    targets = config.target_modules
    if targets is None:
        raise ValueError("config.target_modules is None: name the adapted modules in it.")
    missed = [m for m in arrays if not name_matches(m, targets)]
    if missed:
        raise ValueError(
            f"config.target_modules={targets!r} does not match {missed[:5]}: the torch model "
            "would not adapt these modules when loading; add them to target_modules."
        )
    state = {}
    for module, triplet in arrays.items():
        for name, x in zip(
            ("lora_A", "lora_E", "lora_B"), _checked_triplet(module, triplet, config.init_r)
        ):
            # a float32 copy: JAX hands out read-only buffers, which torch will not wrap
            state[f"{PEFT_PREFIX}{module}.{name}"] = torch.from_numpy(np.array(x, np.float32))
    keep = _checked_masks(masks, config, list(arrays))
    cfg = copy.deepcopy(config)
    cfg.rank_pattern = {pattern_key(m): v for m, v in keep.items()} or None
    cfg.inference_mode = True
    state = shrink_state_dict(state, keep)
    files = {WEIGHTS_NAME: weights_bytes(state, cfg.to_dict()), CONFIG_NAME: cfg.to_json_bytes()}
    write_files_atomic(directory, files)
