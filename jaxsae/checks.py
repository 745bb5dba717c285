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
    members = cfg.sweep_configs()
    for i, (member, point) in enumerate(zip(members, cfg.sweep.points, strict=True)):
        try:
            _check_sae(member)
        except ConfigError as e:
            if all(_refusal(other) == str(e) for other in members):  # the shared config's
                # (fault testing: a base config's error was blamed on the sweep's first SAE)
                raise ConfigError(f"{e} (every SAE of the sweep)") from None
            raise ConfigError(f"sweep SAE {i} ({sweep_label(point)}): {e}") from None


def _refusal(cfg: Config) -> str | None:
    """What `_check_sae` refuses of `cfg` (None: nothing)."""
    try:
        _check_sae(cfg)
    except ConfigError as e:
        return str(e)
    return None


# Activations a transcoder may use: those whose codes SAELens's transcoder classes compute
# (ReLU, JumpReLU; BatchTopK is exported as JumpReLU, exactly).
TRANSCODER_ACTIVATIONS = ("relu", "jumprelu", "batchtopk")


def _check_transcoder(cfg: Config) -> None:
    if cfg.sae.activation not in TRANSCODER_ACTIVATIONS:
        why = {"topk": "a TopK transcoder has no exact SAELens layout (its transcoders are ReLU "
                       "or JumpReLU); batchtopk is exported as JumpReLU exactly",
               "matching_pursuit": "matching pursuit decodes its own input, not a target"}
        reason = why.get(cfg.sae.activation, "SAELens has no such transcoder")
        raise ConfigError(f"sae.activation: {cfg.sae.activation} cannot train a transcoder "
                          f"(data.target): {reason}; use one of "
                          f"{', '.join(TRANSCODER_ACTIVATIONS)}")
    if cfg.sae.tied:
        raise ConfigError("sae.tied: a transcoder's encoder reads the input and its decoder "
                          "writes the target, so there is no decoder transpose to tie to")
    if cfg.init_from is not None:
        raise ConfigError("init_from: not supported for transcoders yet")


def _check_sae(cfg: Config) -> None:
    kind = activations.get(cfg.sae.activation)
    if cfg.sae.transcoder:
        _check_transcoder(cfg)
    if kind.has_k and not cfg.sae.k <= cfg.sae.d_sae:
        raise ConfigError(f"sae.k: must be in 1..sae.d_sae ({cfg.sae.d_sae}), got {cfg.sae.k}")
    kind.check(cfg.sae)
    if cfg.optim.threshold_lr_scale != 1.0 and not kind.learns_threshold:
        raise ConfigError(f"optim.threshold_lr_scale: sae.activation {cfg.sae.activation} "
                          "learns no threshold (only jumprelu does)")
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

        _, spec = synthetic.parse_spec(cfg.data.generate, key="data.generate")
        if cfg.data.stream and spec.kind == "transcoder":
            raise ConfigError("data.stream: the transcoder generator's pairs are not streamed; "
                              "write them (data.path) and set data.target to their target/")
        if spec.kind == "transcoder" and cfg.data.target is None:  # (fault testing: the
            # pairs were written, then the run refused as if the truth were another data's)
            raise ConfigError(f"data.target: the transcoder generator writes pairs; train a "
                              f"transcoder on them with data.target: {cfg.data.path}/target")
    penalties.check_terms(cfg)
