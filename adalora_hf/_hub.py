"""``push_to_hub`` for adapters: upload what ``save_pretrained`` writes, never the base model.

The adapter is saved into a temporary directory and that directory is uploaded with
``huggingface_hub.HfApi.upload_folder`` (after ``create_repo(..., exist_ok=True)``), which is
what PEFT's ``push_to_hub`` amounts to for an adapter: the repository receives
``adapter_config.json``, the weights and ``README.md``.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._model import AdaLoraModel

__all__ = ["push_adapter_to_hub"]


def push_adapter_to_hub(
    owner: AdaLoraModel,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
) -> Any:
    """Save the adapters of ``owner`` into a temporary directory and upload it to ``repo_id``;
    returns ``upload_folder``'s result (the commit info)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        owner.save_pretrained(
            tmp, safe_serialization=safe_serialization, selected_adapters=selected_adapters
        )
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload AdaLoRA adapter",
            revision=revision,
            create_pr=create_pr,
        )
