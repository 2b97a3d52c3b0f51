"""``TaskType`` and ``PeftConfig``: the two PEFT names that user code imports next to
``AdaLoraConfig`` (``from peft import PeftConfig, TaskType``), in this library's own terms."""

from __future__ import annotations

import abc
import json
import os
from typing import Any

from ._config import AdaLoraConfig
from ._enums import PeftType, TaskType
from ._serialization import CONFIG_NAME

__all__ = ["PeftConfig", "PeftType", "TaskType"]


class PeftConfig(abc.ABC):  # noqa: B024 (a name for isinstance, nothing to implement)
    """PEFT's base config name, for code that reads an adapter's config without knowing its
    type: ``PeftConfig.from_pretrained(path)`` returns an ``AdaLoraConfig`` for an AdaLoRA
    adapter and raises ``ValueError`` naming the type for any other (this library implements
    AdaLoRA only). ``isinstance(cfg, PeftConfig)`` holds for every ``AdaLoraConfig``."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        return issubclass(other, AdaLoraConfig)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> AdaLoraConfig:
        """Read ``adapter_config.json`` at ``path`` (see ``AdaLoraConfig.from_pretrained``);
        ``subfolder`` is honoured, other keywords (PEFT's Hub options) are ignored."""
        path = os.fspath(path)
        if kwargs.get("subfolder"):
            path = os.path.join(path, kwargs["subfolder"])
        return AdaLoraConfig.from_pretrained(path)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The fields of a config file as a dict (PEFT's ``from_json_file``)."""
        with open(os.fspath(path), encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{os.fspath(path)} holds no JSON object; it is not a {CONFIG_NAME}.")
        return data
