"""``LoftQConfig`` and the one check of ``init_lora_weights`` / ``loftq_config`` together.

PEFT's shape: ``loftq_bits`` and ``loftq_iter``, stored in ``adapter_config.json`` as a plain
dict under ``loftq_config``. The settings themselves are checked by
``adalora_torch._loftq.check_loftq_settings`` (one place for the supported bit widths).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from adalora_torch._loftq import check_loftq_settings

__all__ = ["LoftQConfig", "check_loftq_config"]


@dataclass
class LoftQConfig:
    """LoftQ initialisation settings (``AdaLoraConfig(init_lora_weights="loftq",
    loftq_config=LoftQConfig(...))``; a dict with these keys works too).

    ``loftq_bits``: 4 (bitsandbytes NF4) or 8 (LLM.int8()); ``loftq_iter``: alternating
    quantize / SVD steps (>= 1). See docs/quantized.md.

    >>> LoftQConfig(loftq_bits=4, loftq_iter=2)
    LoftQConfig(loftq_bits=4, loftq_iter=2)
    >>> LoftQConfig(loftq_bits=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: loftq_bits=3 is not supported: use 4 (bitsandbytes NF4, blocks of 64) or 8 ...
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_loftq_settings(self.loftq_bits, self.loftq_iter)


def check_loftq_config(init_lora_weights: object, loftq_config: object) -> dict[str, Any]:
    """The checked ``loftq_config`` as the plain dict the config stores (``{}`` without LoftQ).

    Raises ``ValueError`` saying what to set: LoftQ needs both ``init_lora_weights="loftq"``
    and a ``loftq_config``; unknown keys and unsupported values are refused.
    """
    if isinstance(loftq_config, LoftQConfig):
        loftq_config = asdict(loftq_config)
    if loftq_config is None:
        loftq_config = {}
    if not isinstance(loftq_config, dict):
        raise ValueError(
            f"loftq_config must be a LoftQConfig or a dict with keys loftq_bits and loftq_iter, "
            f"got {type(loftq_config).__name__}."
        )
    if init_lora_weights != "loftq":
        if loftq_config:
            raise ValueError(
                f"loftq_config={loftq_config!r} is set but init_lora_weights="
                f"{init_lora_weights!r}: set init_lora_weights='loftq' to start from LoftQ, or "
                "leave loftq_config empty."
            )
        return {}
    if not loftq_config:
        raise ValueError(
            "init_lora_weights='loftq' needs loftq_config: pass "
            "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1) (or that dict)."
        )
    known = {f.name for f in fields(LoftQConfig)}
    unknown = sorted(set(loftq_config) - known)
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {unknown}: the keys are {sorted(known)}.")
    return asdict(LoftQConfig(**loftq_config))
