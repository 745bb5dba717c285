"""The finding-reproducing benchmark scripts in their --quick form: benchmarks/experiments/run.py
(every toy experiment runs end to end and reports a verdict with its figures) and
benchmarks/stitching.py. The full runs, and whether the findings hold, are in RESULTS.md.
Slow (about a minute together): run with scripts/test.sh -m slow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("hierarchy_absorption", "matryoshka_mixing", "strong_child", "circles")


@pytest.mark.slow
def test_quick_experiments(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "experiments" / "run.py"),
                           "--quick", "--out", str(tmp_path), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "experiments-quick.md").read_text()
    for name in NAMES:
        assert re.search(rf"^## {name}: (holds|does not hold)$", report, re.M), name
        bench_dir = tmp_path / f"exp-{name.replace('_', '-')}-quick"
        assert (bench_dir / "results.csv").is_file(), bench_dir
    assert "rows per covered plane" in report and "parent recall" in report
    assert "nan" not in report.lower()


@pytest.mark.slow
def test_quick_stitching(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stitching.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\| novel \| \d+ \| \d+ \| \d+ \| \d+ \|$", proc.stdout, re.M)
    verdict = r"^Frankenstein MSE [\d.]+ vs trained at equal width [\d.]+: (lower|NOT lower)$"
    assert re.search(verdict, proc.stdout, re.M)
    assert (tmp_path / "frankenstein" / "sae" / "cfg.json").is_file()
