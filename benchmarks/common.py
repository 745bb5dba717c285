"""Shared by the benchmarks: time the real jitted train step or any jitted function, describe
the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import jax
import numpy as np

from jaxsae.build import build
from jaxsae.config import Config


def add_shape_args(parser) -> None:
    """--d-in, --d-sae, --batch, defaulting to the throughput issue's CPU shape."""
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=12288)
    parser.add_argument("--batch", type=int, default=4096)


def machine() -> dict:
    """What the figures were measured on (put beside every figure in RESULTS.md)."""
    device = jax.devices()[0]
    return {
        "date": date.today().isoformat(),
        "platform": device.platform,
        "device": getattr(device, "device_kind", str(device)),
        "n_devices": len(jax.devices()),
        "cpu_cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "jax": jax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # huge pages: see jaxsae.hostmem
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_train_step(cfg: Config, d_in: int, *, steps: int = 3, warmup: int = 1,
                    seed: int = 0) -> dict:
    """Seconds per step of `make_train_step(cfg)` as `train()` compiles it (sharded, donated),
    on a fixed non-negative random batch already on the devices. Compilation is excluded."""
    built = build(cfg, d_in)
    state = built.init()
    rng = np.random.default_rng(seed)
    batch = np.abs(rng.standard_normal((cfg.optim.batch_size, d_in), np.float32))
    batch = jax.device_put(batch, built.batch_sharding)
    t0 = time.perf_counter()
    compiled = built.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.median(times)), "step_s_min": float(np.min(times)),
            "compile_s": compile_s, "finite": bool(np.all(metrics["finite"]))}


def median_seconds(fn, *args, reps: int = 5) -> float:
    """Median seconds of fn(*args) (jitted) over `reps` calls, after a compile and warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@contextlib.contextmanager
def experiment_dir(out: Path | None, script: str) -> Iterator[Path]:
    """Where an experiment keeps its data, SAEs and analyses: `out` (created, or an earlier
    run's of the same script, which it marks; any other directory that is not empty is
    refused, since the experiment replaces what it writes there), else a temporary directory
    removed at the end."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix=f"{script}-") as tmp:
            yield Path(tmp)
        return
    marker = out / f".{script}"
    if out.exists() and not (out.is_dir() and (marker.is_file() or not any(out.iterdir()))):
        sys.stderr.write(f"{script}: error: --out {out}: exists and is not this "
                         "experiment's directory; give another (its files would be "
                         "replaced)\n")
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"written by benchmarks' {script}; its contents are replaced\n")
    yield out
