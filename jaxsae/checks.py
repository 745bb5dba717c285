"""`check_run(cfg)`: what a run config needs from the rest of jaxsae, checked once where a run
starts (`train`, `bench`, `import`), never when a config is replaced, compared or restored.

The schema (`jaxsae.config`) checks each value and how the sections combine; here: the
activation is registered and its parameters (`k`, `freeze`) fit it, every loss term exists
and its hyper-parameters type-check and make sense with the SAE, `data.generate` describes a
generator, and no TPU is asked to run the Pallas (Triton) kernels. Disk checks belong to the
phase that reads the disk: `init_from` is read only when a run starts from it (a resumed run
never needs it again).
"""

from __future__ import annotations

import jax

from jaxsae import activations, penalties, sae, trackers
from jaxsae.config import Config, sweep_label
from jaxsae.errors import ConfigError


def check_run(cfg: Config) -> None:
    """Refuses, naming the key, a config that cannot run; a sweep is checked SAE by SAE."""
    trackers.check_available(cfg)
    if cfg.optim.kernels == "pallas" and jax.default_backend() not in ("gpu", "cpu"):
        raise ConfigError(f"optim.kernels: the Pallas kernels are written for GPUs (Triton); "
                          f"use auto or xla on {jax.default_backend()}")
    if cfg.sweep is None:
        _check_sae(cfg)
        return
    for name in {name for point in cfg.sweep.points for name in point}:
        if name == "sae.k" and not activations.get(cfg.sae.activation).has_k:
            raise ConfigError(f"sweep.sae.k: sae.activation {cfg.sae.activation} has no k")
    for i, (member, point) in enumerate(zip(cfg.sweep_configs(), cfg.sweep.points,
                                            strict=True)):
        try:
            _check_sae(member)
        except ConfigError as e:
            raise ConfigError(f"sweep SAE {i} ({sweep_label(point)}): {e}") from None


def _check_sae(cfg: Config) -> None:
    kind = activations.get(cfg.sae.activation)
    if kind.has_k and not cfg.sae.k <= cfg.sae.d_sae:
        raise ConfigError(f"sae.k: must be in 1..sae.d_sae ({cfg.sae.d_sae}), got {cfg.sae.k}")
    kind.check(cfg.sae)
    if not kind.scale_invariant and cfg.data.normalize != "none":
        raise ConfigError(f"data.normalize: {cfg.sae.activation} codes change when the input "
                          "scale is folded into the weights; use none")
    names = sae.param_names(cfg.sae)
    for name in cfg.freeze:
        if name not in names:
            raise ConfigError(f"freeze: {name!r} is not a parameter of this SAE (it has "
                              f"{', '.join(names)})")
    if not set(names) - set(cfg.freeze):
        raise ConfigError("freeze: freezes every parameter")
    if cfg.data.generate is not None:
        from jaxsae.data import synthetic

        synthetic.parse_spec(cfg.data.generate, key="data.generate")
    penalties.check_terms(cfg)
