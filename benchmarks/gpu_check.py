"""The whole GPU check in one command, for the few minutes a lent accelerator gives.

    scripts/gpu_check.sh                     (on the GPU machine: installs .whl, runs this)
    python benchmarks/gpu_check.py [--out DIR] [--budget-s 450] [--quick]
        [--saelens-python PY|none] [--parts machine,tests,throughput,kernel_steps,widths,ops]

Parts, in this order, each skipped (and said so) once the time budget would not hold it:
- machine: the device, jax / jaxlib / torch versions, and the measured 8192³ bf16 matmul rate;
- tests: the tests that exercise the step, the sparse paths in every kernel implementation
  (Pallas compiled by Triton there), training on one device, resume, and bf16 compute
  (float32 matmuls at full precision: JAX_DEFAULT_MATMUL_PRECISION=highest);
- throughput: `benchmarks/throughput.py`'s figures at d_in 2304, d_sae 65,536, batch 8192, bf16,
  for ReLU + L1, TopK k=64, BatchTopK k=64 and Matryoshka-BatchTopK (prefixes d_sae/16, /4, 1),
  each beside SAELens's trainer of that architecture on the same GPU in the same run;
- kernel_steps: the TopK step with each kernel implementation (optim.kernels cpu, xla, pallas),
  the step alone on a resident batch: which one `auto` should pick on this GPU;
- widths: TopK k=64 from d_sae 16,384 to 262,144: tokens/s and peak device memory;
- ops: `benchmarks/sparse_topk_ops.py`'s table (each gather / scatter / top-k, per
  implementation).
Everything goes into DIR/gpu_check.json (rewritten after every part, so a run cut short keeps
what it measured), with failures recorded, not raised: one failing part does not cost the
others. --quick: tiny shapes and one test, to check the script itself on the CPU (the test
suite runs it so).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import sparse_topk_ops  # noqa: E402
import throughput  # noqa: E402
from common import machine, time_train_step  # noqa: E402

from jaxsae.outputs import atomic_write, json_text  # noqa: E402

PARTS = ("machine", "tests", "throughput", "kernel_steps", "widths", "ops")

# The test subset run on the GPU: the sparse paths and every kernel implementation against
# references, the step end to end on one device, exact resume, bf16 compute.
GPU_TESTS = [
    "tests/test_kernels.py",
    "tests/test_sae.py::test_sparse_path_equals_dense_path",
    "tests/test_sae.py::test_top_k_indices_matches_lax_top_k",
    "tests/test_sae.py::test_batch_top_k_entries_against_numpy",
    "tests/test_sae.py::test_scatter_decode_and_its_gradients",
    "tests/test_train.py::test_run_directory_contract",
    "tests/test_train.py::test_resume_after_crash_is_exact",
    "tests/test_train.py::test_bfloat16_compute_tracks_float32",
    "tests/test_train.py::test_every_activation_trains_and_exports",
    "tests/test_transcoder.py::test_transcoder_sparse_path_equals_dense_path",
]
QUICK_TESTS = ["tests/test_kernels.py::test_auto_is_the_backends_choice"]

# (shape, parts' sizes): the issue's GPU shape, and a tiny one for --quick.
FULL = {"d_in": 2304, "d_sae": 65536, "batch": 8192, "k": 64, "steps": 5,
        "widths": [16384, 32768, 65536, 131072, 262144], "matmul": 8192, "dtype": "bfloat16"}
QUICK = {"d_in": 32, "d_sae": 256, "batch": 64, "k": 4, "steps": 1, "widths": [256, 512],
         "matmul": 64, "dtype": "bfloat16"}
# Seconds a part is expected to need at the full shape (compiles dominate); a part starts only
# if this much of the budget is left.
NEEDS_S = {"machine": 10, "tests": 60, "throughput": 120, "kernel_steps": 60, "widths": 60,
           "ops": 30}


class Check:
    """The report, and the time budget every part is checked against."""

    def __init__(self, out: Path, budget_s: float, quick: bool, scratch: Path,
                 saelens_python: str):
        self.path = out / "gpu_check.json"
        self.scratch = scratch
        self.saelens_python = saelens_python
        self._data = None
        self.deadline = time.monotonic() + budget_s
        self.quick = quick
        self.report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick,
                             "budget_s": budget_s, "saelens_python": saelens_python,
                             "parts": {}}

    @property
    def data(self):
        """The activations the training parts read (16 batches), written on first use."""
        if self._data is None:
            s = shape(self)
            self._data = throughput.write_data(self.scratch / "data", s["batch"], s["d_in"])
        return self._data

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, part) -> None:
        need = 0 if self.quick else NEEDS_S[name]
        if self.left() < need:
            left = max(0.0, self.left())
            self.report["parts"][name] = {
                "skipped": f"{left:.0f} s left of the budget, the part needs ~{need} s"}
        else:
            t0 = time.monotonic()
            try:
                result = part(self)
            except Exception:  # recorded; the other parts still run
                result = {"error": traceback.format_exc(limit=8)[-3000:]}
            result["seconds"] = round(time.monotonic() - t0, 1)
            self.report["parts"][name] = result
        self.save()
        print(f"gpu_check: {name}: {summarise(self.report['parts'][name])}", flush=True)

    def save(self) -> None:
        self.report["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write(self.path, json_text(self.report))


def summarise(result: dict) -> str:
    for key in ("skipped", "error"):
        if key in result:
            return f"{key}: {result[key].strip().splitlines()[-1]}"
    failed = errors_in(result)  # (fault testing: a SAELens that failed said "done")
    return f"done in {result.get('seconds', 0)} s" + (
        f"; errors in {', '.join(failed)}" if failed else "")


def errors_in(result: dict, where: str = "") -> list[str]:
    """Where a part's report holds an error (`error` or `*_error`, at any depth): the part
    failed, even if it measured the rest."""
    found = []
    for key, value in result.items():
        here = f"{where}.{key}" if where else key
        if key == "error" or key.endswith("_error"):
            found.append(where or key)
        elif isinstance(value, dict):
            found += errors_in(value, here)
    return found


def shape(check: Check) -> dict:
    return QUICK if check.quick else FULL


def part_machine(check: Check) -> dict:
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "triton",
                 "sae-lens"):
        try:  # read from the installed metadata, nothing imported
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    n = shape(check)["matmul"]
    rate = throughput.roofline(n, n, n, "bfloat16")
    return {"machine": machine(), "versions": versions,
            "devices": [str(d) for d in jax.devices()],
            f"matmul_{n}_bf16_tflops": rate / 1e12}


def part_tests(check: Check) -> dict:
    tests = QUICK_TESTS if check.quick else GPU_TESTS
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    timeout = max(10.0, min(check.left() - 10, 150 if not check.quick else 300))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               "-n", "0" if check.quick else "4", *tests]
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        return {"passed": False, "timed_out_s": timeout,
                "output_tail": tail.decode() if isinstance(tail, bytes) else tail}
    return {"passed": proc.returncode == 0, "returncode": proc.returncode,
            "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "",
            "output_tail": (proc.stdout + proc.stderr)[-3000:]}


def _args(check: Check, arch: str, **changes) -> argparse.Namespace:
    s = shape(check)
    argv = ["--arch", arch, "--d-in", str(s["d_in"]), "--d-sae", str(s["d_sae"]),
            "--batch", str(s["batch"]), "--k", str(s["k"]), "--steps", str(s["steps"]),
            "--compute-dtype", s["dtype"]]
    if check.saelens_python:
        argv += ["--saelens-python", check.saelens_python]
    args = throughput.parser().parse_args(argv)
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def part_throughput(check: Check) -> dict:
    out = {}
    archs = ("relu", "topk", "batchtopk", "matryoshka_batchtopk")
    for arch in archs:
        if not check.quick and check.left() < 20:
            out[arch] = {"skipped": "out of budget"}
            continue
        try:
            out[arch] = throughput.measure(_args(check, arch), check.data, saelens=False)
        except Exception:
            out[arch] = {"error": traceback.format_exc(limit=6)[-2000:]}
        check.report["parts"]["throughput"] = out  # keep what is measured so far
        check.save()
    # SAELens: every architecture in one process (torch and SAELens start once).
    measured = [arch for arch in archs if "jaxsae_tokens_per_s" in out[arch]]
    try:
        theirs = throughput.saelens_rates(_args(check, "matryoshka_batchtopk"), measured)
    except Exception:
        out["saelens_error"] = traceback.format_exc(limit=6)[-2000:]
        theirs = {}
    for arch, rate in theirs.items():
        out[arch]["saelens_tokens_per_s"] = rate
        out[arch]["jaxsae_over_saelens"] = (out[arch]["jaxsae_tokens_per_s"] / rate
                                            if rate else None)
    step = {arch: out[arch]["jaxsae_step_only_tokens_per_s"] for arch in measured}
    if "topk" in step:
        out["batchtopk_step_over_topk"] = {
            arch: step["topk"] / step[arch] for arch in ("batchtopk", "matryoshka_batchtopk")
            if arch in step}
    return out


def part_kernel_steps(check: Check) -> dict:
    out = {}
    for kernels in ("cpu", "xla", "pallas"):
        args = _args(check, "topk", kernels=kernels)
        try:
            timing = time_train_step(throughput.train_config(args, check.data), args.d_in,
                                     steps=args.steps)
            out[kernels] = {**timing, "tokens_per_s": args.batch / timing["step_s"]}
        except Exception:
            out[kernels] = {"error": traceback.format_exc(limit=6)[-2000:]}
    rates = {k: v["tokens_per_s"] for k, v in out.items() if "tokens_per_s" in v}
    if rates:
        out["fastest"] = max(rates, key=rates.get)
    return out


def part_widths(check: Check) -> dict:
    s = shape(check)
    out = {}
    for d_sae in s["widths"]:
        if not check.quick and check.left() < 20:
            out[str(d_sae)] = {"skipped": "out of budget"}
            continue
        try:
            args = _args(check, "topk", d_sae=d_sae)
            timing = time_train_step(throughput.train_config(args, check.data), args.d_in,
                                     steps=args.steps)
            stats = jax.devices()[0].memory_stats() or {}
            out[str(d_sae)] = {**timing, "tokens_per_s": s["batch"] / timing["step_s"],
                               "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                               "bytes_limit": stats.get("bytes_limit")}
        except Exception:
            out[str(d_sae)] = {"error": traceback.format_exc(limit=6)[-2000:]}
        check.report["parts"]["widths"] = out
        check.save()
    return out


def part_ops(check: Check) -> dict:
    s = shape(check)
    rows = sparse_topk_ops.run(s["batch"], s["d_in"], s["d_sae"], s["k"], s["dtype"],
                               ["cpu", "xla", "pallas"])
    return {"shape": {key: s[key] for key in ("batch", "d_in", "d_sae", "k", "dtype")},
            "ms": rows}


PART_FUNCTIONS = {"machine": part_machine, "tests": part_tests, "throughput": part_throughput,
                  "kernel_steps": part_kernel_steps, "widths": part_widths, "ops": part_ops}


def part_list(text: str) -> list[str]:
    parts = [p for p in text.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or text!r}; "
                                         f"choose from {', '.join(PARTS)}")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")),
                        help="the report's folder (default $OUT, else ./gpu_check_out)")
    parser.add_argument("--budget-s", type=float, default=450,
                        help="seconds for the whole check; parts that would not fit are "
                             "skipped (default 450: a 10-minute device call with room)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and one test: checks the script on any machine")
    parser.add_argument("--saelens-python", default=None,
                        help="the Python with SAELens (default: this one if it has SAELens, "
                             "else .venv-interop's; none: skip SAELens)")
    parser.add_argument("--parts", type=part_list, default=list(PARTS),
                        help=f"comma-separated, from {','.join(PARTS)} (default all)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(args.out, args.budget_s, args.quick, Path(tmp),
                      args.saelens_python or _default_saelens_python())
        for name in args.parts:
            check.run(name, PART_FUNCTIONS[name])
    failed = [name for name, r in check.report["parts"].items()
              if errors_in(r) or r.get("passed") is False]
    print(f"gpu_check: report in {check.path}" + (f"; failed: {', '.join(failed)}"
                                                    if failed else ""))
    return 1 if failed else 0


def _default_saelens_python() -> str:
    if importlib.util.find_spec("sae_lens") is not None:
        return sys.executable
    return str(throughput.INTEROP_PYTHON) if throughput.INTEROP_PYTHON.exists() else "none"


if __name__ == "__main__":
    sys.exit(main())
