"""benchmarks/mfu.py keeps working on CPU at a tiny size (CI has no GPU)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pretrain.model import count_flops, create_model


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mfu.py"
    spec = importlib.util.spec_from_file_location("mfu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_benchmark_runs_on_cpu_and_counts_flops(capsys):
    mfu = load_benchmark()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert mfu.main(["--device", "cpu", "--model", "tubevit-ti", "--frames", "8", "--size", "64", "--batch", "2",
                         "--precision", "fp32", "--steps", "1", "--warmup", "0", "--options", "default,ckpt",
                         "--matmul-size", "128", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["device"] == "cpu" and out["matmul_peak_tflops"] > 0 and len(out["runs"]) == 2
    forward = count_flops(create_model("tubevit-ti", num_classes={"video": 400}, skip_unfit_tubes=True), (8, 64, 64))
    for run in out["runs"]:
        assert run["model_tflops_per_step"] == pytest.approx(3 * forward["total"] * 2 / 1e12, abs=1e-4)
        assert run["step_s"] > 0 and run["mfu"] > 0 and run["tokens_per_clip"] == forward["tokens"]
    ckpt = next(r for r in out["runs"] if r["options"] == "ckpt")
    # Both are rounded to 4 decimals: a relative tolerance fails on a slow CPU (small MFU).
    assert ckpt["hfu"] == pytest.approx(ckpt["mfu"] * 4 / 3, abs=(4 / 3 + 1) * 0.5e-4)
    assert out["ratio"] == max(r["mfu"] for r in out["runs"])


def test_mfu_benchmark_rejects_unknown_options():
    with pytest.raises(SystemExit):
        load_benchmark().main(["--device", "cpu", "--options", "warp"])
