"""``adalora demo``: the table and the paired comparison, the files it writes, the backbone
cache, several seeds, the adapter in PEFT, and a missing CUDA device."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

RunCli = Callable[..., tuple[int, str, str]]  # the run_cli fixture
AssertPng = Callable[..., None]  # the assert_png fixture


def test_demo_prints_the_table(demo: tuple[Path, str, Path]) -> None:
    _, stdout, _ = demo
    assert "test CE" in stdout and "test acc" in stdout and "adapter params" in stdout
    pattern = r"^(AdaLoRA|LoRA r=1|LoRA r=8|head) +(\d+\.\d{4}) +([01]\.\d{4}) "
    rows = {m: (float(ce), float(acc)) for m, ce, acc in re.findall(pattern, stdout, re.M)}
    assert set(rows) == {"AdaLoRA", "LoRA r=1", "LoRA r=8", "head"}
    assert all(ce > 0 and 0.0 <= acc <= 1.0 for ce, acc in rows.values())
    assert "built now" in stdout  # the cache was empty
    # the paired comparison with LoRA at equal final parameters, and a verdict either way
    printed = float(re.findall(r"^  test CE  ([+-]\d\.\d{4}) ± ", stdout, re.M)[0])
    assert printed == pytest.approx(rows["AdaLoRA"][0] - rows["LoRA r=1"][0], abs=2e-4)
    verdict = "beats" if printed < 0 else "does NOT beat"
    assert f"AdaLoRA {verdict} LoRA r=1 at equal final parameters" in stdout


def test_demo_writes_adapter_plots_and_numbers(
    demo: tuple[Path, str, Path], assert_png: AssertPng
) -> None:
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
    # LoRA at rank target_r has as many adapter parameters as AdaLoRA keeps, within a few %;
    # the ceiling, LoRA at init_r, has init_r / target_r times more
    ada, lora = rows["AdaLoRA"]["adapter_params"], rows["LoRA r=1"]["adapter_params"]
    assert abs(ada - lora) / ada < 0.05
    assert rows["LoRA r=8"]["adapter_params"] == 8 * lora
    assert all(r["test_loss"] > 0 for r in results["rows"])
    assert rows["head"]["adapter_params"] == 0
    n = len(results["rank_pattern"])
    assert sum(results["rank_pattern"].values()) == results["settings"]["target_r"] * n


def test_demo_reuses_the_cached_backbone(
    demo: tuple[Path, str, Path], tmp_path: Path, run_cli: RunCli
) -> None:
    _, _, cache = demo
    assert len(list(cache.glob("vit-digits04-*/model.safetensors"))) == 1
    code, stdout, stderr = run_cli(
        "demo", "--tiny", "--steps", "12", "--out", str(tmp_path), "--cache-dir", str(cache),
        "--device", "cpu", "--deltaT", "2", "--seeds", "2",
    )  # fmt: skip
    assert code == 0, stderr
    assert "cached" in stdout
    # two seeds: two tables, the second seed's files in a subdirectory, paired differences
    assert "seed 0:" in stdout and "seed 1:" in stdout
    assert (tmp_path / "seed-1" / "results.json").is_file()
    assert "paired over 2 seed(s)" in stdout


@pytest.mark.filterwarnings("ignore")
def test_the_demo_adapter_loads_in_peft(demo: tuple[Path, str, Path]) -> None:
    peft = pytest.importorskip("peft")
    import torch
    from transformers import ViTForImageClassification

    from adalora_hf.cli._data import accuracy, digits

    out, _, cache = demo
    (backbone,) = cache.glob("vit-digits04-*")
    model = peft.PeftModel.from_pretrained(
        ViTForImageClassification.from_pretrained(backbone), out / "adalora-adapter"
    )
    results = json.loads((out / "results.json").read_text())
    expected = next(r["accuracy"] for r in results["rows"] if r["method"] == "AdaLoRA")
    data = digits(torch.device("cpu"), results["seed"], results["settings"]["test_size"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo ran: the same float sums, the same predictions
    try:
        assert accuracy(model, data["test"]) == pytest.approx(expected, abs=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_demo_without_cuda_exits_2(run_cli: RunCli) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, stderr = run_cli("demo", "--device", "cuda")
    assert code == 2 and "no CUDA device" in stderr
