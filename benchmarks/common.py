"""Shared by the benchmarks: time the real jitted train step, describe the machine."""

from __future__ import annotations

import os
import platform
import time
from datetime import date
from functools import partial

import jax
import numpy as np

from jaxsae import sharding
from jaxsae.config import Config
from jaxsae.train import init_state, make_train_step


def machine() -> dict:
    """What the figures were measured on (put beside every figure in RESULTS.md)."""
    device = jax.devices()[0]
    return {
        "date": date.today().isoformat(),
        "platform": device.platform,
        "device": getattr(device, "device_kind", str(device)),
        "n_devices": len(jax.devices()),
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }


def time_train_step(cfg: Config, d_in: int, *, steps: int = 3, warmup: int = 1,
                    seed: int = 0) -> dict:
    """Seconds per step of `make_train_step(cfg)` as `train()` compiles it (sharded, donated),
    on a fixed non-negative random batch already on the devices. Compilation is excluded."""
    mesh = sharding.make_mesh(cfg)
    init = partial(init_state, cfg=cfg, d_in=d_in)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(seed))
    shardings = sharding.tree_shardings(mesh, abstract, cfg.sae.d_sae)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
    batch_sharding = sharding.batch_sharding(mesh)
    step = jax.jit(make_train_step(cfg), in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    rng = np.random.default_rng(seed)
    batch = np.abs(rng.standard_normal((cfg.optim.batch_size, d_in), np.float32))
    batch = jax.device_put(batch, batch_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
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
            "compile_s": compile_s, "finite": bool(metrics["finite"])}
