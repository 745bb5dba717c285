"""The loss-term registry.

A loss term is a pure function

    term(out: ForwardOutput, params, *, step, **hparams) -> (value: scalar, metrics: dict)

registered by name with `@register("name")`. Its keyword-only parameters (with type annotations
and defaults) are its hyper-parameters: they are what YAML may set beside `term:`, and they are
type-checked when the config is parsed. The total loss is `Σ coefficient_i(step) · term_i`, where
a coefficient with `warmup_steps` ramps linearly from 0.

Adding a penalty is one function and its registration; it reads what the forward pass already
computed from `ForwardOutput` and never re-runs the encoder or decoder.

Scales follow SAELens so that published coefficients carry over:
  mse = mean over tokens of ‖x̂ − x‖² (summed over d_in),
  l1  = mean over tokens of Σ_i f_i · ‖W_dec,i‖.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp

from jaxsae import sae
from jaxsae.config import keyword_hparams
from jaxsae.errors import ConfigError

if TYPE_CHECKING:
    from jaxsae.config import Config, TermConfig

Metrics = dict[str, jax.Array]


class LossTerm(Protocol):
    def __call__(
        self, out: sae.ForwardOutput, params: sae.Params, *, step: jax.Array, **hparams: Any
    ) -> tuple[jax.Array, Metrics]: ...


CheckFn = Callable[["Config", "TermConfig", str], None]


@dataclass(frozen=True)
class TermSpec:
    name: str
    fn: LossTerm
    hparams: dict[str, Any]
    """Hyper-parameter name -> annotated type (the term's keyword-only parameters)."""
    required: frozenset[str]
    """Hyper-parameters without a default."""
    validate: CheckFn | None = None

    def check(self, cfg: Config, term: TermConfig, key: str) -> None:
        """Refuses combinations that make no sense (e.g. `l0` without `jumprelu`)."""
        if self.validate is not None:
            self.validate(cfg, term, key)


_REGISTRY: dict[str, TermSpec] = {}


def register(name: str, *, check: CheckFn | None = None) -> Callable[[LossTerm], LossTerm]:
    def wrap(fn: LossTerm) -> LossTerm:
        if name in _REGISTRY:
            raise ValueError(f"loss term {name!r} is already registered")
        _REGISTRY[name] = TermSpec(name, fn, *keyword_hparams(fn), check)
        return fn

    return wrap


def get_term(name: str, *, key: str = "term") -> TermSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"{key}: unknown loss term {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def registered() -> list[str]:
    return list(_REGISTRY)


def _require_activation(*allowed: str) -> CheckFn:
    def check(cfg: Config, term: TermConfig, key: str) -> None:
        if cfg.sae.activation not in allowed:
            raise ConfigError(
                f"{key}: term {term.term!r} needs sae.activation in {{{', '.join(allowed)}}}, "
                f"got {cfg.sae.activation!r}"
            )

    return check


# ---------------------------------------------------------------------------------------------
# Total loss


def coefficient(term: TermConfig, step: jax.Array) -> jax.Array:
    """The term's coefficient at `step`: ramps linearly from 0 over `warmup_steps`."""
    if term.warmup_steps <= 0:
        return jnp.asarray(term.coefficient, jnp.float32)
    ramp = jnp.minimum(1.0, step.astype(jnp.float32) / term.warmup_steps)
    return term.coefficient * ramp


def term_labels(terms: Sequence[TermConfig]) -> list[str]:
    """Metric names of the terms: the term's name, suffixed with its index when repeated."""
    names = [t.term for t in terms]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def total_loss(
    terms: Sequence[TermConfig], out: sae.ForwardOutput, params: sae.Params, step: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Σ coefficient_i(step) · term_i; metrics hold each term's unweighted value as loss.<label>."""
    total = jnp.zeros((), jnp.float32)
    metrics: Metrics = {}
    for label, term in zip(term_labels(terms), terms, strict=True):
        value, extra = _REGISTRY[term.term].fn(out, params, step=step, **term.params)
        total = total + coefficient(term, step) * value
        metrics[f"loss.{label}"] = value
        metrics.update({f"{label}.{k}": v for k, v in extra.items()})
    return total, metrics


# ---------------------------------------------------------------------------------------------
# Terms


@register("mse")
def mse(
    out: sae.ForwardOutput, params: sae.Params, *, step: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Reconstruction error: mean over tokens of Σ_d (x̂ − x)²."""
    return jnp.mean(jnp.sum(jnp.square(out.x_hat - out.x), axis=-1)), {}


@register("l1")
def l1(
    out: sae.ForwardOutput, params: sae.Params, *, step: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Sparsity: mean over tokens of Σ_i f_i · ‖W_dec,i‖ (activations weighted by decoder norm)."""
    return jnp.mean(out.acts @ out.decoder_norms), {}


def _check_auxk(cfg: Config, term: TermConfig, key: str) -> None:
    _require_activation("topk", "batchtopk")(cfg, term, key)
    k_aux = term.params.get("k_aux")
    if k_aux is not None and not 0 < k_aux <= cfg.sae.d_sae:
        raise ConfigError(f"{key}.k_aux: must be in 1..sae.d_sae ({cfg.sae.d_sae}), got {k_aux}")
    if term.params.get("dead_tokens", 1) <= 0:
        raise ConfigError(f"{key}.dead_tokens: must be > 0")


@register("auxk", check=_check_auxk)
def auxk(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    k_aux: int | None = None,
    dead_tokens: int = 10_000_000,
) -> tuple[jax.Array, Metrics]:
    """Dead-latent auxiliary loss (Gao et al., 2024) for TopK / BatchTopK.

    The k_aux largest pre-activations among dead latents (no firing for `dead_tokens` tokens)
    reconstruct the main residual e = x − x̂ (held fixed): ‖e − ê‖² / ‖e − mean(e)‖², averaged
    over the batch, scaled by min(1, n_dead / k_aux), and 0 when no latent is dead.
    `k_aux` defaults to d_in / 2.
    """
    d_sae = out.pre_acts.shape[-1]
    k = min(k_aux or out.x.shape[-1] // 2, d_sae)
    dead = out.tokens_since_fired >= dead_tokens
    n_dead = jnp.sum(dead)
    masked = jnp.where(dead, out.pre_acts, -jnp.inf)
    aux_acts = jnp.nan_to_num(sae.topk(masked, k), neginf=0.0)
    residual = jax.lax.stop_gradient(out.x - out.x_hat)
    residual_hat = aux_acts @ params["W_dec"]
    error = jnp.sum(jnp.square(residual_hat - residual), axis=-1)
    spread = jnp.sum(jnp.square(residual - residual.mean(axis=0)), axis=-1)
    normalised = jnp.mean(error) / jnp.maximum(jnp.mean(spread), 1e-12)
    scale = jnp.minimum(1.0, n_dead / k)
    return jnp.where(n_dead > 0, scale * normalised, 0.0), {"n_dead": n_dead}


def _check_l0(cfg: Config, term: TermConfig, key: str) -> None:
    _require_activation("jumprelu")(cfg, term, key)
    if term.params.get("bandwidth", 1.0) <= 0:
        raise ConfigError(f"{key}.bandwidth: must be > 0")


@register("l0", check=_check_l0)
def l0(
    out: sae.ForwardOutput, params: sae.Params, *, step: jax.Array, bandwidth: float = 0.001
) -> tuple[jax.Array, Metrics]:
    """JumpReLU sparsity: mean over tokens of Σ_i H(z_i − θ_i), with a straight-through
    gradient for θ of width `bandwidth` (Rajamanoharan et al., 2024)."""
    fired = sae.step_ste(out.pre_acts, params["threshold"], bandwidth)
    return jnp.mean(jnp.sum(fired, axis=-1)), {}
