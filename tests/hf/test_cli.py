"""The ``adalora`` command: ``demo`` on a tiny setting, ``inspect`` on ours, PEFT's and bad paths.

The demo runs once per module (``--tiny``: a 2-layer, 16-wide ViT pretrained for 40 steps, into
a temporary cache) and the tests read what it wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from adalora_hf.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 30


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 200 and height >= 150


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    code, stdout, stderr = run_cli(
        "demo", "--tiny", "--steps", str(STEPS), "--seed", "1", "--out", str(out),
        "--cache-dir", str(cache), "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    return out, stdout, cache


def test_demo_prints_the_table(demo: tuple[Path, str, Path]) -> None:
    _, stdout, _ = demo
    assert "test acc" in stdout and "adapter params" in stdout
    rows = dict(re.findall(r"^(AdaLoRA|LoRA|head) +([01]\.\d{4}) ", stdout, re.MULTILINE))
    assert set(rows) == {"AdaLoRA", "LoRA", "head"}
    assert all(0.0 <= float(accuracy) <= 1.0 for accuracy in rows.values())
    assert "built now" in stdout  # the cache was empty


def test_demo_writes_adapter_plots_and_numbers(demo: tuple[Path, str, Path]) -> None:
    out, _, _ = demo
    adapter = out / "adalora-adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    assert config["modules_to_save"] == ["classifier"]
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert_png(out / "ranks.png")
    assert_png(out / "budget_loss.png")
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    # LoRA at rank target_r has as many adapter parameters as AdaLoRA keeps, within a few %
    ada, lora = rows["AdaLoRA"]["adapter_params"], rows["LoRA"]["adapter_params"]
    assert abs(ada - lora) / ada < 0.05
    assert rows["head"]["adapter_params"] == 0
    n = len(results["rank_pattern"])
    assert sum(results["rank_pattern"].values()) == results["settings"]["target_r"] * n


def test_demo_reuses_the_cached_backbone(demo: tuple[Path, str, Path], tmp_path: Path) -> None:
    _, _, cache = demo
    assert len(list(cache.glob("vit-digits04-*/model.safetensors"))) == 1
    code, stdout, stderr = run_cli(
        "demo", "--tiny", "--steps", "12", "--out", str(tmp_path), "--cache-dir", str(cache),
        "--device", "cpu", "--deltaT", "2",
    )  # fmt: skip
    assert code == 0, stderr
    assert "cached" in stdout


@pytest.mark.filterwarnings("ignore")
def test_the_demo_adapter_loads_in_peft(demo: tuple[Path, str, Path]) -> None:
    peft = pytest.importorskip("peft")
    import torch
    from transformers import ViTForImageClassification

    from adalora_hf._demo import _accuracy, _digits

    out, _, cache = demo
    (backbone,) = cache.glob("vit-digits04-*")
    model = peft.PeftModel.from_pretrained(
        ViTForImageClassification.from_pretrained(backbone), out / "adalora-adapter"
    )
    results = json.loads((out / "results.json").read_text())
    expected = next(r["accuracy"] for r in results["rows"] if r["method"] == "AdaLoRA")
    data = _digits(torch.device("cpu"), results["seed"], results["settings"]["test_size"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo ran: the same float sums, the same predictions
    try:
        assert _accuracy(model, data["test"]) == pytest.approx(expected, abs=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_inspect_the_demo_adapter(demo: tuple[Path, str, Path], tmp_path: Path) -> None:
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
    demo: tuple[Path, str, Path], tmp_path: Path, given: str, written: str
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
def test_inspect_a_peft_adapter(tmp_path: Path) -> None:
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
def test_inspect_a_peft_adapter_saved_before_allocation(tmp_path: Path) -> None:
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
def test_inspect_rejects_what_is_not_an_adapter(tmp_path: Path, case: str) -> None:
    path, message = _bad_paths(tmp_path)[case]
    code, stdout, stderr = run_cli("inspect", str(path))
    assert code == 2
    assert message in stderr
    assert stderr.startswith("adalora inspect: ") and "Traceback" not in stderr
    assert stdout == ""


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "adalora_hf", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_arguments_exit_2_before_any_work(tmp_path: Path) -> None:
    assert run_cli("demo", "--steps", "0")[0] == 2
    assert run_cli("frobnicate")[0] == 2
    assert run_cli("demo", "--tinit-frac", "0.6", "--tfinal-frac", "0.5")[0] == 2
    cache = tmp_path / "cache"
    code, _, stderr = run_cli("demo", "--init-r", "4", "--target-r", "6", "--cache-dir", str(cache))
    assert code == 2 and "target_r (6) is larger than init_r (4)" in stderr
    assert not cache.exists()  # refused before pretraining


def test_demo_without_cuda_exits_2() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, stderr = run_cli("demo", "--device", "cuda")
    assert code == 2 and "no CUDA device" in stderr
