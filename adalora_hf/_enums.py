"""PEFT's string enums, ``TaskType`` and ``PeftType`` (AdaLoRA's member only): members are
``str``, equal to their values, print as their values and are written to JSON as them."""

from __future__ import annotations

import enum

__all__ = ["PeftType", "TaskType"]


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)


class TaskType(_StrEnum):
    """PEFT's task types (``AdaLoraConfig.task_type``); ``TaskType.CAUSAL_LM == "CAUSAL_LM"``."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(_StrEnum):
    """``AdaLoraConfig.peft_type``: PEFT's enum of adapter types, reduced to AdaLoRA."""

    ADALORA = "ADALORA"
