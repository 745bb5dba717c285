"""Shared fixtures: small synthetic data sets and configs that compile and train in seconds."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Compile settings of the test suite, set before JAX is imported (nothing above imports it;
# JAX reads them as it is imported: jaxsae.data, imported below, imports JAX, and from
# 2026-12-02 on, with these settings after it, the tests compiled with no cache) and
# inherited by the xdist workers and by every process a test starts. Most of a test's
# time is XLA compiling small programs, not running them, and many tests compile the same ones:
# - one compilation cache for the whole session (a fresh directory per run, so a run costs
#   what it costs on a fresh clone; JAXSAE_TEST_JAX_CACHE=DIR keeps one between runs);
# - LLVM without its expensive optimisations (the same HLO, only slower machine code; timings
#   are measured by benchmarks/, never here).
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = os.environ.get("JAXSAE_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="jaxsae-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    if "JAXSAE_TEST_JAX_CACHE" not in os.environ:
        atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()

from jaxsae.config import config_from_dict  # noqa: E402  (after the settings above)
from jaxsae.data.synthetic import SuperpositionSpec, generate_superposition  # noqa: E402


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's own process with `devices` CPU devices."""
    return f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={devices}"


# tests/lm need the optional extra `lm` (torch + transformers): scripts/test.sh runs them with
# .venv-interop's Python, which has it; the core environment has no torch.
collect_ignore = [] if all(importlib.util.find_spec(m) for m in ("torch", "transformers")) \
    else ["lm"]

SMALL_SPEC = SuperpositionSpec(n_features=48, d_in=16, tokens=16384, mean_l0=3.0,
                               shard_tokens=4096, seed=3)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """16384 tokens of 48 superposed features in 16 dims, in 4 shards (read-only: don't modify)."""
    return generate_superposition(SMALL_SPEC, tmp_path_factory.mktemp("data") / "small",
                                  progress=False)


def small_config_dict(data_dir: Path, run_dir: Path, **sections) -> dict:
    """A tiny run: 64 latents, batch 256, 24 steps, checkpoint every 8."""
    tree = {
        "name": "test",
        "run_dir": str(run_dir),
        # (the tests were written for raw activations: normalising is `auto`'s default)
        "data": {"path": str(data_dir), "eval_tokens": 2048, "shuffle_buffer": 4096,
                 "normalize": "none"},
        "sae": {"d_sae": 64, "activation": "relu", "decoder_norm": "free"},
        "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 0.1}],
        "optim": {"lr": 3e-3, "batch_size": 256, "total_tokens": 256 * 24, "warmup_steps": 2,
                  "decay_fraction": 0.25},
        "checkpoint": {"every_steps": 8, "keep": 3},
        "log": {"every_steps": 4, "curves": False},  # drawn where tested: test_curves.py
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def small_config(data_dir: Path, run_dir: Path, **sections):
    return config_from_dict(small_config_dict(data_dir, run_dir, **sections))


@pytest.fixture
def no_analysis_figures(monkeypatch):
    """analyze (and repair, which analyses before and after) without its three PNG figures,
    for tests that read only its tables and reports: drawing them was most of a small
    analysis's time (~1 s a figure). They are drawn and checked in tests/test_geometry.py."""
    from jaxsae.analysis import geometry

    monkeypatch.setattr(geometry, "_plots", lambda *args, **kwargs: None)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def watched_loader(*, on_batch=None, crash_at: int | None = None):
    """A `make_loader` for train(): the real Loader, whose batches `on_batch(rows)` sees and
    which raises RuntimeError("simulated crash") when batch `crash_at` is requested."""
    from jaxsae.data.loader import Loader

    class Watched(Loader):
        def batches(self):
            for i, item in enumerate(super().batches()):
                if i == crash_at:
                    raise RuntimeError("simulated crash")
                if on_batch is not None:
                    on_batch(item[0])
                yield item

    return Watched


def train_until_crash(cfg, at_batch: int, *, on_batch=None) -> None:
    """Runs train(cfg) with a loader that fails when batch `at_batch` is requested (a crash
    after the checkpoints written so far); `on_batch(rows)` sees every batch handed out."""
    from jaxsae.train import train

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False, make_loader=watched_loader(on_batch=on_batch,
                                                               crash_at=at_batch))


def logging_to(lines: list):
    """A LoopHook that keeps the lines MetricLogger logs in `lines`."""
    class Lines:
        def on_step(self, done):
            pass

        def on_log(self, done, logged):
            lines.extend(logged)

    return Lines()
