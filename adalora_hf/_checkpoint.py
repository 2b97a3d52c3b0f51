"""The rank allocator's state on disk, without pickle: JSON for the scalars and the pattern,
safetensors for the importance EMAs (``adalora_torch.RankAllocator.state_dict`` split in two).
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors.torch import load_file, save_file

from adalora_torch import RankAllocator

__all__ = ["ALLOCATOR_STATE", "ALLOCATOR_TENSORS", "load_allocator_state", "save_allocator_state"]

ALLOCATOR_STATE = "adalora_allocator.json"
ALLOCATOR_TENSORS = "adalora_allocator.safetensors"
_TENSOR_GROUPS = ("ema_sensitivity", "ema_uncertainty")


def save_allocator_state(allocator: RankAllocator, directory: str) -> None:
    """Write ``allocator.state_dict()`` into ``directory`` (two files, no pickle)."""
    state = allocator.state_dict()
    tensors = {
        f"{group}/{name}": t.detach().to("cpu").contiguous()
        for group in _TENSOR_GROUPS
        for name, t in state[group].items()
    }
    rest = {k: v for k, v in state.items() if k not in _TENSOR_GROUPS}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ALLOCATOR_TENSORS), metadata={"format": "pt"})
    with open(os.path.join(directory, ALLOCATOR_STATE), "w", encoding="utf-8") as f:
        json.dump(rest, f)


def load_allocator_state(allocator: RankAllocator, directory: str) -> bool:
    """Restore the state written by ``save_allocator_state``; False when ``directory`` has none."""
    json_path = os.path.join(directory, ALLOCATOR_STATE)
    tensor_path = os.path.join(directory, ALLOCATOR_TENSORS)
    if not (os.path.isfile(json_path) and os.path.isfile(tensor_path)):
        return False
    with open(json_path, encoding="utf-8") as f:
        state: dict[str, Any] = json.load(f)
    tensors = load_file(tensor_path)
    for group in _TENSOR_GROUPS:
        prefix = group + "/"
        state[group] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    allocator.load_state_dict(state)
    return True
