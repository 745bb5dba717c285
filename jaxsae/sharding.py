"""Device mesh and the one table that maps logical axes to mesh axes.

Batches are sharded over `data`; the dictionary is sharded over `model` along d_sae (W_enc
columns, W_dec rows, b_enc, threshold), and optimiser state follows the parameter it belongs to.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsae.config import Config
from jaxsae.errors import ConfigError

# logical axis -> mesh axis (None: replicated)
LOGICAL_AXES: dict[str, str | None] = {"batch": "data", "d_sae": "model", "d_in": None}

# parameter name -> logical axes of its dimensions
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "W_enc": ("d_in", "d_sae"),
    "b_enc": ("d_sae",),
    "W_dec": ("d_sae", "d_in"),
    "b_dec": ("d_in",),
    "threshold": ("d_sae",),
}


def spec(*logical: str | None) -> PartitionSpec:
    return PartitionSpec(*(LOGICAL_AXES[a] if a else None for a in logical))


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """A (data, model) mesh over all devices; one of the two sizes may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, model = cfg.mesh.data, cfg.mesh.model
    if data == -1:
        if n % model:
            raise ConfigError(f"mesh.model: {model} does not divide the {n} devices")
        data = n // model
    elif model == -1:
        if n % data:
            raise ConfigError(f"mesh.data: {data} does not divide the {n} devices")
        model = n // data
    if data * model != n:
        raise ConfigError(f"mesh: data ({data}) x model ({model}) must equal the {n} devices")
    processes = len({d.process_index for d in devices})
    if data % processes:  # a `model` group would span processes: each would need every row
        raise ConfigError(
            f"mesh.data: {data} is not a multiple of the {processes} processes (each process "
            f"reads its own rows of the batch, so mesh.model, {model}, must divide the "
            f"{n // processes} devices of a process)")
    if cfg.sae.d_sae % model:
        raise ConfigError(f"mesh.model: {model} devices do not divide sae.d_sae ({cfg.sae.d_sae})")
    if cfg.optim.batch_size % data:
        raise ConfigError(
            f"optim.batch_size: {cfg.optim.batch_size} is not divisible by mesh data size {data}"
        )
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec("batch", None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(mesh: Mesh, abstract_tree: Any, d_sae: int, *, stacked: bool = False) -> Any:
    """Shardings for any tree holding parameters (params, optimiser state, train state).

    A leaf under a dict key named like a parameter, with that parameter's rank, takes the
    parameter's spec; other [d_sae] vectors (e.g. tokens since fired) are sharded along
    d_sae; everything else is replicated. `stacked`: every leaf has a leading sweep axis
    (one entry per SAE of a sweep), which is not sharded.
    """
    lead = (None,) if stacked else ()

    def choose(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = names[-1] if names else None
        shape = leaf.shape[len(lead):]
        if name in PARAM_AXES and len(PARAM_AXES[name]) == len(shape):
            return NamedSharding(mesh, PartitionSpec(*lead, *spec(*PARAM_AXES[name])))
        if len(shape) == 1 and shape[0] == d_sae:
            return NamedSharding(mesh, PartitionSpec(*lead, *spec("d_sae")))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, abstract_tree)
