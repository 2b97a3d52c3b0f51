"""The ``README.md`` model card ``save_pretrained`` writes next to the adapter, as PEFT does.

The card is a short text with Hub metadata (``library_name: peft``, so the Hub offers PEFT's
loading snippet, the base model when known, tags ``adalora``) and the library version. It is
written with the adapter's files, as one set (``_save_load.save_adapters``). A ``README.md``
that is not this card (the user's own, or one of another version) is never touched: PEFT
adds its metadata to such a file, but a save here changes no file it did not write (``_io``).
"""

from __future__ import annotations

import os

from ._serialization import README_NAME

__all__ = ["model_card_bytes"]

_VERSIONS_HEADING = "### Framework versions"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adalora")
    except PackageNotFoundError:
        return "unknown"


def _new_card(base_model: str | None, version_line: str) -> str:
    meta = ["---", "library_name: peft", "tags:", "- adalora", "- lora"]
    if base_model:
        meta.insert(2, f"base_model: {base_model}")
    body = [
        "# AdaLoRA adapter",
        "",
        "An AdaLoRA adapter (adapter_config.json, adapter weights) in PEFT's format, written "
        "by adalora_hf. Load it with `peft.PeftModel.from_pretrained(base_model, path)` or "
        "`adalora_hf.AdaLoraModel.from_pretrained(base_model, path)`.",
        "",
        _VERSIONS_HEADING,
        "",
        version_line,
    ]
    return "\n".join([*meta, "---", "", *body, ""])


def model_card_bytes(directory: str, base_model: str | None) -> bytes | None:
    """The ``README.md`` to write into ``directory`` with the adapter, or None when the
    directory has a ``README.md`` that is not this card (the user's own, kept untouched)."""
    card = _new_card(base_model, f"- adalora {_version()}").encode("utf-8")
    path = os.path.join(directory, README_NAME)
    if not os.path.isfile(path):
        return card
    with open(path, "rb") as f:
        return card if f.read() == card else None
