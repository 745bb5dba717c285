"""benchmarks/throughput.py runs end to end (tiny shapes) and its MFU arithmetic is right."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def _script():
    """benchmarks/throughput.py as a module (its directory on sys.path while it loads)."""
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


# (one case runs the script as its own process, as it is run; the others call its measure()
# in this process with the same arguments, its JSON read back the same way: a process start
# and its imports cost seconds each)
@pytest.mark.parametrize(("arch", "dtype", "process"), [
    ("topk", "float32", False), ("relu", "bfloat16", True),
    ("matryoshka_batchtopk", "float32", False)])
def test_throughput_script_runs(arch, dtype, process, tmp_path):
    argv = ["--arch", arch, "--d-in", "16", "--d-sae", "256", "--batch", "64", "--k", "4",
            "--steps", "1", "--no-saelens", "--compute-dtype", dtype, "--peak-tflops", "2"]
    if process:
        proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
    else:
        module = _script()
        args = module.parser().parse_args(argv)
        result = json.loads(json.dumps(module.measure(args, module.write_data(
            tmp_path / "data", args.batch, args.d_in)), indent=1))
    assert result["shape"]["compute_dtype"] == dtype
    assert result["jaxsae_tokens_per_s"] > 0 and result["jaxsae_step_only_tokens_per_s"] > 0
    flops = 2 * 64 * 16 * (256 + 4 * 4) if arch != "relu" else 10 * 64 * 16 * 256
    expected = result["jaxsae_tokens_per_s"] / 64 * flops / 2e12
    assert result["mfu"] == pytest.approx(expected, rel=1e-9)
    encoder_flops = 2 * 64 * 16 * 256  # the sparse step's floor: its dense encoder matmul
    assert result["jaxsae_over_encoder_limit"] == pytest.approx(
        result["jaxsae_tokens_per_s"] / 64 * encoder_flops / (result["roofline_gflops"] * 1e9),
        rel=1e-9)
    parts = result["floor_parts"]  # what a sparse step cannot go below, and its ratio
    assert (parts is None) == (result["floor_over_encoder_limit"] is None) == (arch == "relu")
    if arch != "relu":
        assert set(parts) == {"encoder_matmul_s", "optimizer_s", "selection_s"}
        assert all(v > 0 for v in parts.values())
        assert result["floor_over_encoder_limit"] == pytest.approx(
            parts["encoder_matmul_s"] / sum(parts.values()), rel=1e-9)
    if arch == "matryoshka_batchtopk":
        assert result["shape"]["widths"] == [16, 64, 256]
    assert result["saelens_tokens_per_s"] is None


def test_known_peaks_take_the_longest_prefix():
    module = _script()
    assert module.known_peak("NVIDIA H200") == 989e12
    assert module.known_peak("NVIDIA H20") == 148e12
    assert module.known_peak("NVIDIA H100 PCIe") == 756e12
    assert module.known_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert module.known_peak("cpu") is None
