"""benchmarks/gpu_check.py's time budget and flags (its run end to end, SAELens included, is
tests/interop/test_gpu_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_parts_that_do_not_fit_the_budget_are_skipped_and_said_so(tmp_path):
    """Nothing is measured (no data is even written) once the budget is spent; the report
    says which parts were skipped and why."""
    proc = _run("--budget-s", "0", "--parts", "machine,widths", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    parts = json.loads((tmp_path / "o" / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["machine", "widths"]
    assert "needs ~10 s" in parts["machine"]["skipped"]
    assert "needs ~60 s" in parts["widths"]["skipped"]


def test_bad_flags_are_refused_naming_them(tmp_path):
    proc = _run("--parts", "machine,gpu", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--parts" in proc.stderr and "'gpu'" in proc.stderr
    (tmp_path / "file").write_text("keep me")
    proc = _run("--out", str(tmp_path / "file"))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
    assert (tmp_path / "file").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


def test_an_error_inside_a_part_fails_the_check():
    """(fault testing: SAELens failing inside the throughput part, or one kernel's step, was
    reported "done" with exit status 0)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    throughput = {"relu": {"jaxsae_tokens_per_s": 1.0}, "saelens_error": "Traceback ...\nboom",
                  "seconds": 3.0}
    assert gpu_check.errors_in(throughput) == ["saelens_error"]
    assert gpu_check.summarise(throughput) == "done in 3.0 s; errors in saelens_error"
    kernels = {"cpu": {"step_s": 1.0}, "pallas": {"error": "Traceback ...\nno GPU"}}
    assert gpu_check.errors_in(kernels) == ["pallas"]
    assert gpu_check.errors_in({"relu": {"jaxsae_tokens_per_s": 1.0}, "seconds": 1}) == []
