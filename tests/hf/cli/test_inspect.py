"""``adalora inspect`` on the demo's adapter, on PEFT's adapters and on paths that are not
adapters."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

RunCli = Callable[..., tuple[int, str, str]]  # the run_cli fixture
AssertPng = Callable[..., None]  # the assert_png fixture


def test_inspect_the_demo_adapter(
    demo: tuple[Path, str, Path], tmp_path: Path, run_cli: RunCli, assert_png: AssertPng
) -> None:
    out, _, _ = demo
    code, stdout, stderr = run_cli(
        "inspect", str(out / "adalora-adapter"), "--out", str(tmp_path / "h.png")
    )
    assert code == 0, stderr
    ranks = json.loads((out / "results.json").read_text())["rank_pattern"]
    for name, rank in ranks.items():
        line = next(x for x in stdout.splitlines() if x.startswith(name + " "))
        assert int(line.split()[1]) == rank
    total = next(x for x in stdout.splitlines() if x.startswith("total ("))
    assert int(total.split()[3]) == sum(ranks.values())
    assert "modules_to_save" in stdout
    assert_png(tmp_path / "h.png")


@pytest.mark.parametrize(("given", "written"), [("heat", "heat.png"), (".", "ranks.png")])
def test_inspect_reports_the_file_it_wrote(
    demo: tuple[Path, str, Path],
    tmp_path: Path,
    given: str,
    written: str,
    run_cli: RunCli,
    assert_png: AssertPng,
) -> None:
    out, _, _ = demo
    code, stdout, stderr = run_cli(
        "inspect", str(out / "adalora-adapter"), "--out", str(tmp_path / given)
    )
    assert code == 0, stderr
    target = (tmp_path / written).resolve()
    assert_png(target)
    assert Path(stdout.strip().splitlines()[-1].split("heatmap: ")[1]).resolve() == target


def _peft_adapter(path: Path, train_steps: int) -> dict[str, int]:
    """A tiny PEFT AdaLoRA ViT, trained ``train_steps`` steps and saved; its ranks per module."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=16, num_labels=3,
    )  # fmt: skip
    model = ViTForImageClassification(config)
    targets = sorted(
        {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        - {"classifier"}
    )
    peft_config = peft.AdaLoraConfig(
        init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10,
        target_modules=targets, modules_to_save=["classifier"],
    )  # fmt: skip
    peft_model = peft.get_peft_model(model, peft_config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], 1e-2)
    for step in range(train_steps):
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
        peft_model(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    peft_model.save_pretrained(path)
    pattern = peft_model.peft_config["default"].rank_pattern
    if pattern is None:
        return {}
    return {k.removesuffix(".lora_E").removesuffix(".default"): sum(v) for k, v in pattern.items()}


@pytest.mark.filterwarnings("ignore")
def test_inspect_a_peft_adapter(tmp_path: Path, run_cli: RunCli, assert_png: AssertPng) -> None:
    expected = _peft_adapter(tmp_path / "peft", train_steps=10)
    assert expected and sum(expected.values()) == 2 * len(expected)
    code, stdout, stderr = run_cli("inspect", str(tmp_path / "peft"))
    assert code == 0, stderr
    for name, rank in expected.items():
        line = next(x for x in stdout.splitlines() if x.startswith(name + " "))
        assert int(line.split()[1]) == rank
    assert "ranks from rank_pattern" in stdout
    assert_png(tmp_path / "peft" / "ranks.png", min_bytes=2_000)


@pytest.mark.filterwarnings("ignore")
def test_inspect_a_peft_adapter_saved_before_allocation(tmp_path: Path, run_cli: RunCli) -> None:
    _peft_adapter(tmp_path / "peft", train_steps=1)  # no allocation yet: no rank_pattern
    code, stdout, stderr = run_cli("inspect", str(tmp_path / "peft"))
    assert code == 0, stderr
    assert "ranks from weights" in stdout
    rows = [x.split() for x in stdout.splitlines() if x.startswith("vit.")]
    assert rows and all(int(r[1]) == 4 for r in rows)  # init_r rows of lora_E each


def _write_config(path: Path, **fields: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", **fields}))
    return path


def _bad_paths(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "file.txt").write_text("hello")
    (tmp / "empty").mkdir()
    lora = tmp / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    no_weights = _write_config(tmp / "no-weights")
    pickle_only = _write_config(tmp / "pickle-only")
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04")
    corrupt = _write_config(tmp / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    bad_json = tmp / "bad-json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    return {
        "missing": (tmp / "does-not-exist", "no such file or directory"),
        "file": (tmp / "file.txt", "is a file"),
        "no-config": (tmp / "empty", "has no adapter_config.json"),
        "lora": (lora, "'LORA' adapter, not an AdaLoRA one"),
        "no-weights": (no_weights, "no adapter_model.safetensors"),
        "pickle-only": (pickle_only, "adapter_model.bin, a pickle"),
        "corrupt": (corrupt, "not a readable safetensors file"),
        "bad-json": (bad_json, "not valid JSON"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "file", "no-config", "lora", "no-weights", "pickle-only", "corrupt", "bad-json"],
)
def test_inspect_rejects_what_is_not_an_adapter(tmp_path: Path, case: str, run_cli: RunCli) -> None:
    path, message = _bad_paths(tmp_path)[case]
    code, stdout, stderr = run_cli("inspect", str(path))
    assert code == 2
    assert message in stderr
    assert stderr.startswith("adalora inspect: ") and "Traceback" not in stderr
    assert stdout == ""
