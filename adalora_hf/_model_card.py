"""The ``README.md`` model card ``save_pretrained`` writes next to the adapter, as PEFT does.

A new card is a short text with Hub metadata (``library_name: peft``, so the Hub offers PEFT's
loading snippet, the base model when known, tags ``adalora``); an existing ``README.md`` (the
user's own, or one from an earlier save) is kept and only gets a line naming the library
version under ``### Framework versions`` when it lacks one, as PEFT updates its card.
"""

from __future__ import annotations

import os

from ._io import write_file_atomic
from ._serialization import README_NAME

__all__ = ["write_model_card"]

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


def write_model_card(directory: str, base_model: str | None) -> None:
    """Create ``directory/README.md``, or add the version line to an existing one."""
    path = os.path.join(directory, README_NAME)
    version_line = f"- adalora {_version()}"
    if not os.path.isfile(path):
        write_file_atomic(path, _new_card(base_model, version_line).encode("utf-8"))
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if version_line in lines:
        return
    if _VERSIONS_HEADING in lines:
        lines.insert(lines.index(_VERSIONS_HEADING) + 2, version_line)
    else:
        lines += [_VERSIONS_HEADING, "", version_line]
    write_file_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
