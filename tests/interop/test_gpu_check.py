"""benchmarks/gpu_check.py end to end at its --quick shapes on the CPU, SAELens included (this
environment has it), so that a lent GPU's minutes are not spent on the script's own errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_quick_runs_every_part(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick",
                           "--out", str(out), "--saelens-python", sys.executable],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["machine", "tests", "throughput", "kernel_steps", "widths", "ops"]
    assert not [name for name, part in parts.items() if "error" in part or "skipped" in part]
    assert parts["machine"]["versions"]["sae-lens"]  # this environment has it
    assert parts["machine"]["matmul_64_bf16_tflops"] > 0
    assert parts["tests"]["passed"] and "1 passed" in parts["tests"]["summary"]
    for arch in ("relu", "topk", "batchtopk", "matryoshka_batchtopk"):
        result = parts["throughput"][arch]
        assert result["shape"]["compute_dtype"] == "bfloat16"
        assert result["jaxsae_step_only_tokens_per_s"] > 0
        assert result["saelens_tokens_per_s"] > 0, arch  # SAELens ran, bf16 autocast
    ratios = parts["throughput"]["batchtopk_step_over_topk"]
    assert set(ratios) == {"batchtopk", "matryoshka_batchtopk"}
    steps = parts["kernel_steps"]
    assert {"cpu", "xla", "pallas"} <= set(steps) and steps["fastest"] in steps
    assert all(steps[k]["finite"] for k in ("cpu", "xla", "pallas"))
    assert list(parts["widths"]) == ["256", "512", "seconds"]
    assert all(row.keys() >= {"operation", "cpu", "xla", "pallas"} for row in parts["ops"]["ms"])
