"""The rank allocator's state on disk, without pickle: JSON for the scalars and the pattern,
safetensors for the importance EMAs (``adalora_torch.RankAllocator.state_dict`` split in two).

Each file is replaced atomically (``_io.write_file_atomic``), and the safetensors metadata
holds the SHA-256 of the JSON written with it, so a pair from two different saves (a crash
between the two replacements) is refused instead of resuming with EMAs of another step.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from safetensors.torch import save

from adalora_torch import RankAllocator

from ._io import write_file_atomic
from ._serialization import read_safetensors

if TYPE_CHECKING:
    pass

__all__ = [
    "ALLOCATOR_STATE",
    "ALLOCATOR_TENSORS",
    "load_allocator_state",
    "save_allocator_state",
]

ALLOCATOR_STATE = "adalora_allocator.json"
ALLOCATOR_TENSORS = "adalora_allocator.safetensors"
_TENSOR_GROUPS = ("ema_sensitivity", "ema_uncertainty")
_DIGEST = "adalora_state_sha256"  # safetensors metadata: SHA-256 of the JSON file


def save_allocator_state(allocator: RankAllocator, directory: str) -> None:
    """Write ``allocator.state_dict()`` into ``directory`` (two files, no pickle, each
    replaced atomically: the tensors first, the JSON last)."""
    state = allocator.state_dict()
    tensors = {
        f"{group}/{name}": t.detach().to("cpu").contiguous()
        for group in _TENSOR_GROUPS
        for name, t in state[group].items()
    }
    rest = {k: v for k, v in state.items() if k not in _TENSOR_GROUPS}
    text = json.dumps(rest).encode("utf-8")
    metadata = {"format": "pt", _DIGEST: hashlib.sha256(text).hexdigest()}
    blob = bytes(save(tensors, metadata=metadata))
    os.makedirs(directory, exist_ok=True)
    write_file_atomic(os.path.join(directory, ALLOCATOR_TENSORS), blob)
    write_file_atomic(os.path.join(directory, ALLOCATOR_STATE), text)


def load_allocator_state(allocator: RankAllocator, directory: str) -> bool:
    """Restore the state written by ``save_allocator_state``; False when ``directory`` has none.

    Raises ``ValueError``, leaving ``allocator`` unchanged, when only one of the two files is
    there, either is truncated or corrupted, they come from two different saves, or the state
    belongs to other adapters or settings (``RankAllocator.load_state_dict``).
    """
    json_path = os.path.join(directory, ALLOCATOR_STATE)
    tensor_path = os.path.join(directory, ALLOCATOR_TENSORS)
    present = [os.path.isfile(p) for p in (json_path, tensor_path)]
    if not any(present):
        return False
    if not all(present):
        have, lack = (json_path, tensor_path) if present[0] else (tensor_path, json_path)
        raise ValueError(
            f"{directory!r} holds {os.path.basename(have)} without {os.path.basename(lack)}: the "
            "allocator state is incomplete (a save interrupted, or a file deleted). Resume from "
            "an earlier checkpoint that has both files."
        )
    with open(json_path, "rb") as f:
        text = f.read()
    try:
        state: Any = json.loads(text)
    except ValueError as err:
        raise ValueError(
            f"{json_path} is not valid JSON ({err}): the allocator state is corrupted. Resume "
            "from an earlier checkpoint."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{json_path} is not a JSON object: it is not an allocator state.")
    tensors, metadata = read_safetensors(
        tensor_path,
        "the allocator state is truncated or corrupted. Resume from an earlier checkpoint.",
    )
    digest = metadata.get(_DIGEST)
    if digest is not None and digest != hashlib.sha256(text).hexdigest():
        raise ValueError(
            f"{ALLOCATOR_STATE} and {ALLOCATOR_TENSORS} in {directory!r} come from two different "
            "saves (a save was interrupted between them): resume from an earlier checkpoint."
        )
    for group in _TENSOR_GROUPS:
        prefix = group + "/"
        state[group] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        allocator.load_state_dict(state)
    except ValueError as err:
        raise ValueError(
            f"{directory!r}: {err} The checkpoint belongs to another run: resume it with the model "
            "and AdaLoraConfig it was written with."
        ) from err
    return True
