"""From a config to compiled functions: mesh -> abstract init -> shardings -> jitted init and
step. A sweep is the same step under jax.vmap over stacked states; `Built` is what `train`,
the export command and the benchmarks share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxsae import sae, sharding
from jaxsae.config import Config
from jaxsae.step import SWEEP_AXIS, TrainState, hyper_of, init_state, make_train_step


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a run's `seed` (any 64-bit integer), from all its bits: a seed in
    [0, 2^32) gives jax.random.PRNGKey(seed)'s key, as it always did; others, which PRNGKey
    cuts to their low 32 bits (with JAX's 64-bit types off), get a key of their own (fault
    testing: seeds 0 and 2^32 trained the same SAE, which a bench would report as two
    seeds)."""
    if 0 <= seed < 2**32:
        return jax.random.PRNGKey(seed)
    bits = seed % 2**64
    return jnp.asarray(np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32))


@dataclass(frozen=True)
class Built:
    """The compiled pieces of a run: what train(), export and the benchmarks share."""

    mesh: Mesh
    members: list[Config]
    """One config per SAE: [cfg] for a single run, the points of cfg.sweep for a sweep."""
    abstract: TrainState
    """Shapes and dtypes of the state (jax.eval_shape of the init); a sweep's leaves have a
    leading axis of len(members)."""
    state_sharding: Any
    batch_sharding: NamedSharding
    init: Callable[..., TrainState]
    """(params=None) -> state from the config seed(s), created already sharded (never on one
    device first). `params` (e.g. from init_from) is the start of every SAE."""
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
    """The jitted train_step, state donated; a sweep's metrics have a leading SAE axis."""

    @property
    def is_sweep(self) -> bool:
        return len(self.abstract.step.shape) == 1

    def member_params(self, params: sae.Params, i: int) -> sae.Params:
        """SAE i's parameters out of (host) parameters of the whole state."""
        return jax.tree.map(lambda a: a[i], params) if self.is_sweep else params


def build(cfg: Config, d_in: int, devices: list | None = None, input_scale: float = 1.0,
          d_out: int = 0, target_scale: float = 1.0, input_norm: float | None = None) -> Built:
    """mesh -> abstract init -> shardings -> jitted init and step. `d_out`: a transcoder's
    target width (its batches are [x | target] rows), `target_scale` its targets' scale;
    `input_norm`: the median norm of the inputs as the SAE reads them (`sae.init_l0`).

    A sweep is the same step under jax.vmap: every SAE gets its own state and hyper-parameters
    (stacked along a leading axis) and all of them see the same batch, read once.
    """
    members = cfg.sweep_configs()
    k_swept = len({m.sae.k for m in members}) > 1
    # What the SAEs share (shapes, terms, schedule); the rest comes in through Hyper.
    static = dataclasses.replace(
        members[0], sae=dataclasses.replace(members[0].sae, k=max(m.sae.k for m in members)))
    mesh = sharding.make_mesh(static, devices)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = make_train_step(static, input_scale, mesh,
                                 None if cfg.sweep is None else SWEEP_AXIS, d_out,
                                 target_scale)
    # (one key per SAE, made outside the init: fault testing found a sweep's seeds cast to
    # int32 there, and seeds of 2^31 or more refused in a traceback)
    keys = [seed_key(m.seed) for m in members]

    def init_one(key, params):
        return init_state(key, static, d_in, params, d_out, input_norm)

    if cfg.sweep is None:
        hyper = hyper_of(static)

        def init(params=None):
            return init_one(keys[0], params)

        def step(state, batch):
            return train_step(state, batch, hyper)
    else:
        hypers = jax.tree.map(lambda *v: np.stack(v),
                              *[hyper_of(m, with_k=k_swept) for m in members])

        def init(params=None):
            return jax.vmap(init_one, in_axes=(0, None))(jnp.stack(keys), params)

        together = jax.vmap(train_step, in_axes=(0, None, 0), axis_name=SWEEP_AXIS)
        n, chunk = len(members), cfg.sweep_chunk or len(members)

        def step(state, batch):
            if chunk == n:
                return together(state, batch, hypers)
            # Chunks of `chunk` SAEs, one after another (a loop inside the one step).
            split = partial(jax.tree.map, lambda a: a.reshape(n // chunk, chunk, *a.shape[1:]))
            merge = partial(jax.tree.map, lambda a: a.reshape(n, *a.shape[2:]))
            out = jax.lax.map(lambda sh: together(sh[0], batch, sh[1]),
                              (split(state), split(hypers)))
            return merge(out)

    abstract = jax.eval_shape(init)
    state_sharding = sharding.tree_shardings(mesh, abstract, static.sae.d_sae,
                                             stacked=cfg.sweep is not None)
    step = jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return Built(mesh=mesh, members=members, abstract=abstract, state_sharding=state_sharding,
                 batch_sharding=batch_sharding,
                 init=jax.jit(init, out_shardings=state_sharding), step=step)
