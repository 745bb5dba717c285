"""The loss-term registry.

A loss term is a pure function

    term(out: ForwardOutput, params, *, step, **hparams) -> (value: scalar, metrics: dict)

registered by name with `@register("name")`. Its keyword-only parameters (with type annotations
and defaults) are its hyper-parameters: they are what YAML may set beside `term:`, and they are
type-checked when the config is parsed. The total loss is `Σ coefficient_i(step) · term_i`, where
a coefficient with `warmup_steps` ramps linearly from 0.

Adding a penalty is one function and its registration; it reads what the forward pass already
computed from `ForwardOutput` and never re-runs the encoder or decoder.

mse and l1 are scaled as SAELens scales them, so its published coefficients carry over:
  mse = mean over tokens of ‖x̂ − x‖² (summed over d_in),
  l1  = mean over tokens of Σ_i f_i · ‖W_dec,i‖.
(auxk is normalised as Gao et al. (2024) normalise it, and matryoshka weights its n prefixes
1/n each: the README's table of terms.)
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import activations, kernels, sae
from jaxsae.activations.topk import sparse_topk, topk
from jaxsae.config import DEAD_WINDOW_MAX
from jaxsae.errors import ConfigError
from jaxsae.parsing import parse_value, unknown_key_message

if TYPE_CHECKING:
    from jaxsae.config import Config, TermConfig

Metrics = dict[str, jax.Array]


def keyword_hparams(fn: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """The keyword-only parameters (name -> annotation) of a registered function, and which of
    them have no default (required in the config)."""
    sig = inspect.signature(fn, eval_str=True)
    params = {name: p for name, p in sig.parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "step"}
    types_ = {name: p.annotation if p.annotation is not inspect.Parameter.empty else Any
              for name, p in params.items()}
    required = frozenset(n for n, p in params.items() if p.default is inspect.Parameter.empty)
    return types_, required


class LossTerm(Protocol):
    def __call__(
        self, out: sae.ForwardOutput, params: sae.Params, *, step: jax.Array, **hparams: Any
    ) -> tuple[jax.Array, Metrics]: ...


CheckFn = Callable[["Config", "TermConfig", str], None]
PrefixFn = Callable[["Config", "TermConfig"], tuple[int, ...]]


@dataclass(frozen=True)
class TermSpec:
    name: str
    fn: LossTerm
    hparams: dict[str, Any]
    """Hyper-parameter name -> annotated type (the term's keyword-only parameters)."""
    required: frozenset[str]
    """Hyper-parameters without a default."""
    validate: CheckFn | None = None
    needs_prefixes: PrefixFn | None = None
    """Which dictionary prefixes the forward pass must reconstruct for this term."""

    def check(self, cfg: Config, term: TermConfig, key: str) -> None:
        """Refuses combinations that make no sense (e.g. `l0` without `jumprelu`)."""
        if self.validate is not None:
            self.validate(cfg, term, key)


_REGISTRY: dict[str, TermSpec] = {}


def register(
    name: str, *, check: CheckFn | None = None, prefixes: PrefixFn | None = None
) -> Callable[[LossTerm], LossTerm]:
    """Registers a loss term; `check` refuses bad combinations at config time, `prefixes`
    names the dictionary prefixes whose reconstructions the term reads (`out.prefix_recons`)."""

    def wrap(fn: LossTerm) -> LossTerm:
        if name in _REGISTRY:
            activations.refuse_other_definition("loss term", name, _REGISTRY[name].fn, fn)
        _REGISTRY[name] = TermSpec(name, fn, *keyword_hparams(fn), check, prefixes)
        return fn

    return wrap


def get_term(name: str, *, key: str = "term") -> TermSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"{key}: unknown loss term {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def resolve(term: TermConfig, key: str = "loss") -> TermConfig:
    """`term` with its hyper-parameters parsed against the term's own signature (the config
    keeps them as written): unknown names, wrong types and missing required ones are refused
    naming `key.<name>`."""
    spec = get_term(term.term, key=f"{key}.term")
    params = {}
    for name, value in term.params.items():
        if name not in spec.hparams:
            known = ["term", "name", "coefficient", "warmup_steps", *spec.hparams]
            raise ConfigError(unknown_key_message(f"{key}.{name}", name, known))
        params[name] = parse_value(spec.hparams[name], value, f"{key}.{name}")
    for name in sorted(spec.required - params.keys()):
        raise ConfigError(f"{key}.{name}: required by loss term {term.term!r}")
    return dataclasses.replace(term, params=params)


# The terms that train the dictionary to reconstruct (every loss needs one).
RECONSTRUCTION_TERMS = ("mse", "matryoshka")


def check_terms(cfg: Config) -> None:
    """Every loss term of `cfg` exists, has well-typed hyper-parameters, and makes sense with
    the rest of the config (its `check`)."""
    for i, term in enumerate(cfg.loss):
        key = f"loss[{i}]"
        get_term(term.term, key=f"{key}.term").check(cfg, resolve(term, key), key)
    if not any(t.term in RECONSTRUCTION_TERMS and t.coefficient > 0 for t in cfg.loss):
        # (fault testing: a loss of l1 alone trained and exported a collapsed SAE, EV -0.53)
        raise ConfigError(f"loss: no reconstruction term ({' or '.join(RECONSTRUCTION_TERMS)}) "
                          "with a coefficient > 0, so the decoder would never learn to "
                          "reconstruct; add {term: mse}")


def registered() -> list[str]:
    return list(_REGISTRY)


def _require(capability: str, what: str, also: Sequence[str] = ()) -> CheckFn:
    """A check that the activation has `capability` (a flag of `jaxsae.activations`); the
    activations the refusal lists have the capabilities `also` too (those the term needs
    besides: fault testing found a list naming one that the next check refused)."""

    def check(cfg: Config, term: TermConfig, key: str) -> None:
        if not getattr(activations.get(cfg.sae.activation), capability):
            able = [n for n in activations.registered()
                    if all(getattr(activations.get(n), c) for c in (capability, *also))]
            raise ConfigError(f"{key}: term {term.term!r} needs {what} (sae.activation "
                              f"{', '.join(able)}), got {cfg.sae.activation!r}")

    return check


# ---------------------------------------------------------------------------------------------
# Total loss


def coefficient(term: TermConfig, step: jax.Array, value: jax.Array | None = None) -> jax.Array:
    """The term's coefficient at `step`: ramps linearly from 0 over `warmup_steps`. `value`
    replaces term.coefficient (traced, for sweeps)."""
    full = jnp.asarray(term.coefficient if value is None else value, jnp.float32)
    if term.warmup_steps == "auto":  # (the step's terms are Config.resolved_loss)
        raise ValueError(f"loss term {term.label}: an `auto` ramp is resolved for the run's "
                         "length first (Config.resolved_loss)")
    if term.warmup_steps <= 0:
        return full
    ramp = jnp.minimum(1.0, step.astype(jnp.float32) / term.warmup_steps)
    return full * ramp


def prefix_ends(cfg: Config) -> tuple[int, ...]:
    """The prefix reconstructions the configured terms need from the forward pass."""
    ends: set[int] = set()
    for term in cfg.loss:
        spec = _REGISTRY[term.term]
        if spec.needs_prefixes is not None:
            ends.update(spec.needs_prefixes(cfg, resolve(term)))
    return tuple(sorted(ends))


def term_labels(terms: Sequence[TermConfig]) -> list[str]:
    """Metric names of the terms: the name given to a term, else the term's own name,
    suffixed with its position when several terms are of that kind."""
    labels = [t.label for t in terms]
    return [n if labels.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(labels)]


def total_loss(
    terms: Sequence[TermConfig], out: sae.ForwardOutput, params: sae.Params, step: jax.Array,
    coefficients: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Σ coefficient_i(step) · term_i; metrics hold each term's unweighted value as loss.<label>.
    `coefficients` [n_terms] replaces the configured coefficients (traced, for sweeps)."""
    total, metrics, _ = _total(terms, out, params, step, coefficients, defer=False)
    return total, metrics


def total_loss_deferring(
    terms: Sequence[TermConfig], out: sae.ForwardOutput, params: sae.Params, step: jax.Array,
    coefficients: jax.Array | None = None,
) -> tuple[jax.Array, Metrics, list[Deferred]]:
    """`total_loss` for the training step: the terms whose value and gradient `only_one`
    computes in one branch of several (AuxK's) are left out of the total and returned, to be
    added after the gradient of the rest by `add_deferred` (inside the taken branch, so a
    branch with nothing to add costs nothing: AuxK with no dead latent, ~60 ms of a 0.6 s
    TopK step on the CPU when its zero gradient was added). Their metrics are set there."""
    return _total(terms, out, params, step, coefficients, defer=True)


def _total(terms, out, params, step, coefficients, *, defer: bool):
    total = jnp.zeros((), jnp.float32)
    metrics: Metrics = {}
    deferred: list[Deferred] = []
    for i, (label, term) in enumerate(zip(term_labels(terms), terms, strict=True)):
        token = _DEFER.set(defer)
        try:
            value, extra = _REGISTRY[term.term].fn(out, params, step=step,
                                                   **resolve(term).params)
        finally:
            _DEFER.reset(token)
        weight = coefficient(term, step, None if coefficients is None else coefficients[i])
        if isinstance(value, Branches):
            deferred.append(Deferred(f"loss.{label}", weight, value))
        else:
            total = total + weight * value
            metrics[f"loss.{label}"] = value
        metrics.update({f"{label}.{k}": v for k, v in extra.items()})
    return total, metrics, deferred


def add_deferred(deferred: Sequence[Deferred], params: sae.Params, grads: sae.Params,
                 loss: jax.Array, metrics: Metrics, *, frozen: Sequence[str] = ()
                 ) -> tuple[jax.Array, sae.Params, Metrics]:
    """The deferred terms (`total_loss_deferring`) added: for each, one switch whose taken
    branch computes its value and gradient at `params` (none for the `frozen` ones) and adds
    weight · gradient to `grads` (a branch whose loss is None passes `grads` through).
    Returns the loss, the gradient and the metrics with each term's value."""
    metrics = dict(metrics)
    for term in deferred:
        value, grads = term.branches.add_to(grads, params, term.weight, frozen)
        loss = loss + term.weight * value
        metrics[term.metric] = value
    return loss, grads, metrics


# ---------------------------------------------------------------------------------------------
# Terms


@register("mse")
def mse(
    out: sae.ForwardOutput, params: sae.Params, *, step: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Reconstruction error: mean over tokens of Σ_d (x̂ − x)² (a transcoder's: of its
    target)."""
    return jnp.mean(jnp.sum(jnp.square(out.x_hat - out.target), axis=-1)), {}


def _check_l1(cfg: Config, term: TermConfig, key: str) -> None:
    p = term.params.get("p", 1.0)
    if not 0 < p <= 1:
        raise ConfigError(f"{key}.p: must be in (0, 1], got {p}")
    if term.params.get("tanh_scale") is not None and term.params["tanh_scale"] <= 0:
        raise ConfigError(f"{key}.tanh_scale: must be > 0")
    if term.params.get("tanh_scale") is not None and p != 1.0:
        raise ConfigError(f"{key}: choose either p or tanh_scale, not both")
    if term.params.get("tanh_scale") is not None and term.params.get("norm"):
        raise ConfigError(f"{key}: choose either norm (of v^p) or tanh_scale, not both")


@register("l1", check=_check_l1)
def l1(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    p: float = 1.0,
    weight_by_decoder_norm: bool = True,
    tanh_scale: float | None = None,
    norm: bool = False,
) -> tuple[jax.Array, Metrics]:
    """Sparsity: mean over tokens of Σ_i φ(v_i), v_i = f_i · ‖W_dec,i‖ (or f_i when
    `weight_by_decoder_norm: false`), with φ(v) = v^p (p = 1: L1; p < 1: Lp) or, with
    `tanh_scale: c`, φ(v) = tanh(c · v). `norm: true`: the p-norm (Σ_i v_i^p)^(1/p) of each
    token instead, SAELens's `lp_norm` (what an imported SAE with lp_norm < 1 trained with;
    the same as the sum for p = 1)."""
    if p == 1.0 and tanh_scale is None:
        # Batch mean first, then one dot with the norms: no [batch, d_sae] product to build
        # (nor, in the backward pass, to reduce).
        mean_acts = jnp.mean(out.penalized_acts, axis=0)
        if weight_by_decoder_norm:
            return mean_acts @ out.decoder_norms, {}
        return jnp.sum(mean_acts), {}
    acts = out.penalized_acts
    v = acts * out.decoder_norms if weight_by_decoder_norm else acts
    if tanh_scale is not None:
        return jnp.mean(jnp.sum(jnp.tanh(tanh_scale * v), axis=-1)), {}
    positive = v > 0  # v^p has an infinite slope at 0: keep the gradient of silent latents 0
    safe = jnp.where(positive, v, 1.0)
    per_token = jnp.sum(jnp.where(positive, safe**p, 0.0), axis=-1)
    if norm:  # (the root's slope is infinite at 0 too: a silent token's gradient stays 0)
        some = per_token > 0
        per_token = jnp.where(some, jnp.where(some, per_token, 1.0) ** (1 / p), 0.0)
    return jnp.mean(per_token), {}


_DEFER = contextvars.ContextVar("jaxsae_defer_only_one", default=False)
"""Set by `total_loss_deferring` while a term runs: `only_one` hands back its branches."""


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class Branches:
    """`only_one`'s call, deferred: losses[index](params, *args), None a zero loss."""

    index: jax.Array
    losses: tuple[Callable[..., jax.Array] | None, ...]
    args: tuple[jax.Array, ...]

    def tree_flatten(self):
        return (self.index, self.args), self.losses

    @classmethod
    def tree_unflatten(cls, losses, children):
        return cls(children[0], losses, children[1])

    def value(self, params: sae.Params) -> jax.Array:
        """The chosen loss, differentiable in `params` (not in `args`); only it and its
        gradient are computed."""
        zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
        losses = [(lambda p, *a: zero) if loss is None else loss for loss in self.losses]

        @jax.custom_vjp
        def run(p, a):
            return jax.lax.switch(self.index, losses, p, *a)

        def fwd(p, a):
            return jax.lax.switch(self.index, [jax.value_and_grad(loss) for loss in losses],
                                  p, *a)

        def bwd(grads, g):
            return jax.tree.map(lambda d: d * g, grads), None

        run.defvjp(fwd, bwd)
        return run(params, self.args)

    def add_to(self, grads: sae.Params, params: sae.Params, weight: jax.Array,
               frozen: Sequence[str] = ()) -> tuple[jax.Array, sae.Params]:
        """(the chosen loss, grads + weight · its gradient at params, 0 for the `frozen`
        ones), in one switch.

        The switch runs in a loop of one trip, or none when the chosen loss is None: a
        switch branch that passes `grads` through copies them into the switch's output (38
        ms for a TopK step's 75 MB on the CPU), where a loop that does not run leaves its
        carry where it is."""
        zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))

        def branch(loss):
            if loss is None:
                return lambda g, *a: (zero, g)

            def held(p, *a):
                return loss(sae.holding(p, frozen), *a)

            def taken(g, *a):
                value, d = jax.value_and_grad(held)(params, *a)
                return value, jax.tree.map(lambda s, t: s + (weight * t).astype(s.dtype), g, d)

            return taken

        branches = [branch(loss) for loss in self.losses]
        trips = jnp.asarray([loss is not None for loss in self.losses], jnp.int32)[self.index]

        def body(carry):
            done, _, g = carry
            return (done + 1, *jax.lax.switch(self.index, branches, g, *self.args))

        _, value, grads = jax.lax.while_loop(lambda carry: carry[0] < trips, body,
                                             (jnp.int32(0), zero, grads))
        return value, grads


@dataclass(frozen=True)
class Deferred:
    """A term `total_loss_deferring` left to `add_deferred`: its metric name, its weight."""

    metric: str
    weight: jax.Array
    branches: Branches


jax.tree_util.register_dataclass(Deferred, data_fields=["weight", "branches"],
                                 meta_fields=["metric"])


def only_one(index: jax.Array, losses: Sequence[Callable[..., jax.Array] | None],
             params: sae.Params, *args: jax.Array) -> jax.Array | Branches:
    """losses[index](params, *args) (None: a loss that is 0), differentiable in `params` (not
    in `args`); only the chosen loss and its gradient are computed.

    Autodiff of a plain lax.switch / lax.cond keeps the taken branch's intermediates for the
    backward pass, so every branch not taken still writes zeros of the shapes of the others'
    (for AuxK: [batch, d_sae] arrays, ~50 ms a step on the CPU shape of
    benchmarks/throughput.py with one skipped branch). Here the forward takes the value and the
    gradient in one switch and keeps only the gradient, shaped like `params`. In the training
    step (`total_loss_deferring`) the call is handed back instead, as `Branches`, and the
    gradient is added inside the switch (`add_deferred`). So a term returns only_one's result
    as its value, unchanged (scale it by the term's coefficient instead), and every value the
    losses need that depends on `params` comes through `params` or `args`, never a closure.
    Under vmap, `index` must be the same for every member (else every branch runs).
    """
    branches = Branches(index, tuple(losses), tuple(args))
    if _DEFER.get():
        return branches  # (total_loss_deferring takes it for the term's value)
    return branches.value(params)


def _check_auxk(cfg: Config, term: TermConfig, key: str) -> None:
    _require("has_k", "an activation with k active latents", also=["has_encoder"])(
        cfg, term, key)
    # (matching pursuit has k but no encoder: no pre-activations to pick dead latents by)
    _require("has_encoder", "an encoder whose pre-activations rank the dead latents",
             also=["has_k"])(cfg, term, key)
    k_aux = term.params.get("k_aux")
    if k_aux is not None and not 0 < k_aux <= cfg.sae.d_sae:
        raise ConfigError(f"{key}.k_aux: must be in 1..sae.d_sae ({cfg.sae.d_sae}), got {k_aux}")
    if not 0 < term.params.get("dead_tokens", 1) <= DEAD_WINDOW_MAX:
        raise ConfigError(f"{key}.dead_tokens: must be in 1..{DEAD_WINDOW_MAX} (2^30 tokens, "
                          "where a latent's count of tokens since it fired saturates)")


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
    # The main codes took a sparse path: so does this (on a dictionary split over `model`,
    # each device its own dead latents, as TopK's split selection takes its own).
    sparse = out.top_index is not None
    split = out.mesh is not None and out.mesh.shape["model"] > 1

    def normalised(recon, residual):
        error = jnp.sum(jnp.square(recon - residual), axis=-1)
        spread = jnp.sum(jnp.square(residual - residual.mean(axis=0)), axis=-1)
        return jnp.minimum(1.0, n_dead / k) * jnp.mean(error) / jnp.maximum(jnp.mean(spread),
                                                                            1e-12)

    def dense(params, x, residual, dead, pre_acts):
        # Pre-activations recomputed here, so that their gradient (a dense encoder matmul)
        # exists only in this branch.
        pre_acts = sae.pre_activations(sae.coding_params(params, x, out.transcoder), x)
        recon = topk(jnp.where(dead, pre_acts, -jnp.inf), k, out.mesh) @ params["W_dec"]
        return normalised(recon, residual)

    def dead_block(size):
        """The sparse path's loss with the dead latents in a block of `size`: up to 4·k_aux
        wide a dense problem on the block (the dead latents gathered, padded: their
        pre-activations and decoder rows alone, three matmuls of the block's width); d_sae
        wide, each token's k_aux largest dead latents picked and decoded alone (a gathered
        decode of k_aux rows a token, which costs about a 10·k_aux-wide matmul on the CPU)."""
        def loss(params, x, residual, dead, pre_acts):
            coding = sae.coding_params(params, x, out.transcoder)
            weights = (x, coding["b_dec"], sae.encoder_weight(params), params["b_enc"],
                       pre_acts)
            if size > 4 * k:  # (size is d_sae)
                index = kernels.topk_indices(jnp.where(dead, pre_acts, -jnp.inf), k, out.mesh)
                values = jax.nn.relu(kernels.take_pre_acts(*weights, index)) * dead[index]
                return normalised(kernels.gather_decode(values, params["W_dec"], index),
                                  residual)
            cols = jnp.nonzero(dead, size=size, fill_value=0)[0]
            valid = jnp.arange(size) < n_dead
            keep = valid[None, :]
            if size > k:  # the k largest of each token's dead latents
                masked = jnp.where(valid, jnp.take(pre_acts, cols, axis=1), -jnp.inf)
                last = kernels.topk_indices(masked, k, out.mesh)[:, -1:]
                keep = keep & (masked >= jnp.take_along_axis(masked, last, axis=1))
            codes = jnp.where(keep, jax.nn.relu(kernels.take_columns(*weights, cols)), 0.0)
            return normalised(codes @ jnp.take(params["W_dec"], cols, axis=0), residual)

        return loss

    def split_dictionary(params, x, residual, dead, pre_acts):
        """The sparse path on a dictionary split over `model`: each device takes the k_aux
        largest of its own dead latents, the token's k_aux largest of them all are kept
        (`sparse_topk`'s split selection, the live latents masked out at -inf: where fewer
        than k_aux are dead, those it keeps in their place have the value relu(-inf) = 0 and
        no gradient), and each device decodes its own from its own rows of W_dec
        (`sae.sparse_decode`)."""
        coding = sae.coding_params(params, x, out.transcoder)
        weights = {"b_dec": coding["b_dec"], "W_enc": sae.encoder_weight(params),
                   "b_enc": params["b_enc"]}
        index, values = sparse_topk(weights, x, jnp.where(dead, pre_acts, -jnp.inf), k,
                                    out.mesh)
        codes = activations.Codes(acts=values, batch_threshold=jnp.zeros(()), top_index=index,
                                  top_values=values)
        recon = sae.sparse_decode(params["W_dec"], codes, (d_sae,), x.shape[0], out.mesh)[0]
        return normalised(recon, residual)

    # With no dead latent the loss is 0: its encode, top-k and decode, and their gradients are
    # skipped (in a sweep, unless some SAE has dead latents: the other SAEs' losses are 0 either
    # way). On the sparse path the block is the smallest of dead_blocks() that holds every
    # dead latent (in a sweep: every SAE's); few dead latents then cost a few matmuls of the
    # block's width, not a top-k_aux and a gathered decode of k_aux rows a token.
    if out.sweep_axis is None:
        any_dead, most = n_dead > 0, n_dead
    else:
        any_dead = jax.lax.psum(n_dead, out.sweep_axis) > 0
        most = jax.lax.pmax(n_dead, out.sweep_axis)
    if sparse:
        sizes = dead_blocks(k, d_sae)
        losses = [split_dictionary if split and size == d_sae else dead_block(size)
                  for size in sizes]
        index = jnp.where(any_dead, 1 + jnp.searchsorted(jnp.asarray(sizes), most), 0)
    else:
        losses, index = [dense], any_dead.astype(jnp.int32)
    residual = jax.lax.stop_gradient(out.target - out.x_hat)
    value = only_one(index, [None, *losses], params, out.x, residual, dead,
                     jax.lax.stop_gradient(out.pre_acts))
    return value, {"n_dead": n_dead}


def dead_blocks(k: int, d_sae: int) -> tuple[int, ...]:
    """The widths of AuxK's blocks of dead latents: k and 4k (below d_sae), then d_sae. (More
    widths between 4k and d_sae measured faster with thousands of dead latents, 2.3 s against
    2.8 s a TopK step at 6,000 of 12,288 on the CPU, but each is one more compiled gradient:
    the step compiled in 4.9 s with two more, 3.7 s with these, 3.1 s with d_sae alone.)"""
    return tuple(dict.fromkeys(min(size, d_sae) for size in (k, 4 * k, d_sae)))


def _check_l0(cfg: Config, term: TermConfig, key: str) -> None:
    _require("learns_threshold", "learned thresholds")(cfg, term, key)
    for name in ("bandwidth", "tanh_scale"):
        if term.params.get(name, 1.0) <= 0:
            raise ConfigError(f"{key}.{name}: must be > 0")
    if term.params.get("mode", "step") == "quadratic":
        target = term.params.get("target_l0")
        if target is None or target <= 0:
            raise ConfigError(f"{key}.target_l0: mode quadratic needs a target_l0 > 0")
        _fits_d_sae(cfg, target, f"{key}.target_l0")


@register("l0", check=_check_l0)
def l0(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    mode: Literal["step", "tanh", "quadratic"] = "step",
    bandwidth: float = 0.001,
    tanh_scale: float = 4.0,
    target_l0: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """JumpReLU sparsity (Rajamanoharan et al., 2024). With L0 = mean over tokens of
    Σ_i H(z_i − θ_i) (straight-through gradient for θ of width `bandwidth`):
      step:      L0
      tanh:      mean over tokens of Σ_i tanh(c · f_i · ‖W_dec,i‖), c = `tanh_scale`
      quadratic: mean over tokens of 2/target_l0 · (l0 − target_l0)², l0 a token's count
                 (holds L0 near a target; SAELens's quadratic mode)"""
    if mode == "tanh":
        v = out.acts * out.decoder_norms
        return jnp.mean(jnp.sum(jnp.tanh(tanh_scale * v), axis=-1)), {}
    if mode == "quadratic":  # the target_l0 term, spelled the older way
        loss, count = _quadratic_l0(out, params, target_l0, bandwidth)
        return loss, {"l0_ste": count}
    return _ste_l0(out, params, bandwidth), {}


def _fits_d_sae(cfg: Config, target: float, key: str) -> None:
    """(fault testing: a target L0 above sae.d_sae trained, every threshold driven to 0 after
    a count no token can reach.)"""
    if target > cfg.sae.d_sae:
        raise ConfigError(f"{key}: must be at most sae.d_sae ({cfg.sae.d_sae}), the most "
                          f"latents a token can have active, got {target:g}")


def _check_target_l0(cfg: Config, term: TermConfig, key: str) -> None:
    _require("learns_threshold", "learned thresholds")(cfg, term, key)
    if term.params["target"] <= 0:
        raise ConfigError(f"{key}.target: must be > 0, got {term.params['target']}")
    _fits_d_sae(cfg, term.params["target"], f"{key}.target")
    if term.params.get("bandwidth") is not None and term.params["bandwidth"] <= 0:
        raise ConfigError(f"{key}.bandwidth: must be > 0")


@register("target_l0", check=_check_target_l0)
def target_l0(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    target: float,
    bandwidth: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """Drives L0 to `target` (the quadratic L0 penalty of Gemma Scope 2; SAELens
    `jumprelu_sparsity_loss_mode: quadratic`): the mean over tokens of 2/target · (l0 −
    target)², with l0 = Σ_i H(z_i − θ_i) a token's count and a straight-through gradient for
    θ of width `bandwidth` (0.001). Only the thresholds feel it, both ways: too few active
    latents lower θ, too many raise it."""
    loss, count = _quadratic_l0(out, params, target, 0.001 if bandwidth is None else bandwidth)
    return loss, {"l0": count}


def _quadratic_l0(out: sae.ForwardOutput, params: sae.Params, target: float,
                  bandwidth: float) -> tuple[jax.Array, jax.Array]:
    """(mean over tokens of 2/target · (l0 − target)², mean l0), l0 a token's number of
    active latents, straight-through for θ: SAELens's `quadratic` mode (Gemma Scope 2),
    per token, so a batch whose tokens spread around the target pays for the spread too."""
    fired = kernels.step_ste(out.pre_acts, params["threshold"], bandwidth)
    per_token = jnp.sum(fired, axis=-1)
    return jnp.mean(2.0 / target * jnp.square(per_token - target)), jnp.mean(per_token)


def _ste_l0(out: sae.ForwardOutput, params: sae.Params, bandwidth: float) -> jax.Array:
    """[] mean over tokens of Σ_i H(z_i − θ_i), θ's gradient straight-through."""
    fired = kernels.step_ste(out.pre_acts, params["threshold"], bandwidth)
    return jnp.mean(jnp.sum(fired, axis=-1))


def _check_gated_aux(cfg: Config, term: TermConfig, key: str) -> None:
    _require("has_gate", "a gate")(cfg, term, key)


@register("gated_aux", check=_check_gated_aux)
def gated_aux(
    out: sae.ForwardOutput, params: sae.Params, *, step: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Gated SAEs' auxiliary reconstruction (Rajamanoharan et al., 2024): mean over tokens of
    ‖x − (relu(π_gate) · W_dec + b_dec)‖² through the frozen decoder (no gradient to W_dec or
    b_dec), which is what trains the gate."""
    frozen = jax.lax.stop_gradient
    recon = out.penalized_acts @ frozen(params["W_dec"]) + frozen(params["b_dec"])
    return jnp.mean(jnp.sum(jnp.square(recon - out.target), axis=-1)), {}


# ---------------------------------------------------------------------------------------------
# Structured penalties: groups, nested prefixes, decoder geometry

# Terms that sample fold their own constant into the step's key, so their draws are independent.
_KEY_MATRYOSHKA, _KEY_DECODER_COSINE = 1, 2


def _group_size(cfg: Config, term: TermConfig, key: str) -> int:
    size = term.params["group_size"]
    if size <= 0 or cfg.sae.d_sae % size:
        raise ConfigError(f"{key}.group_size: must divide sae.d_sae ({cfg.sae.d_sae}), got {size}")
    others = {resolve(t).params["group_size"] for t in cfg.loss if "group_size" in t.params}
    if len(others) > 1:
        raise ConfigError(f"{key}.group_size: the group terms use different group sizes "
                          f"({sorted(others)}); they must agree")
    return size


def _safe_norm(v: jax.Array, axis: int) -> jax.Array:
    """‖v‖ along `axis` with a zero (not NaN) gradient at v = 0."""
    sq = jnp.sum(jnp.square(v), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _check_group_l1_l2(cfg: Config, term: TermConfig, key: str) -> None:
    _group_size(cfg, term, key)
    if term.params.get("group_weight") is not None and term.params["group_weight"] <= 0:
        raise ConfigError(f"{key}.group_weight: must be > 0")


@register("group_l1_l2", check=_check_group_l1_l2)
def group_l1_l2(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    group_size: int,
    group_weight: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """Group sparsity (L1 of L2) over contiguous groups of `group_size` latents:
    mean over tokens of Σ_g w_g · ‖(f ⊙ ‖W_dec‖)_g‖₂, w_g = `group_weight` or sqrt(group_size).
    Two latents of one group firing together cost less than two from different groups."""
    v = out.penalized_acts * out.decoder_norms
    groups = v.reshape(v.shape[0], -1, group_size)
    weight = group_weight if group_weight is not None else group_size**0.5
    norms = _safe_norm(groups, axis=-1)
    return weight * jnp.mean(jnp.sum(norms, axis=-1)), {
        "active_groups": jnp.mean(jnp.sum(norms > 0, axis=-1))}


def _check_orthogonality(cfg: Config, term: TermConfig, key: str) -> None:
    if _group_size(cfg, term, key) == 1:  # (fault testing: it trained, a term always 0)
        raise ConfigError(f"{key}.group_size: 1 leaves no two latents in a group, so the term "
                          "is always 0; use a group size of 2 or more")


@register("intra_group_orthogonality", check=_check_orthogonality)
def intra_group_orthogonality(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    group_size: int,
    squared: bool = False,
) -> tuple[jax.Array, Metrics]:
    """Within each group of `group_size` latents, with Ŵ_g the unit-normalised decoder rows:
    Σ_g Σ_{i≠j} relu(ŵ_i · ŵ_j)  (ordered pairs), or with `squared: true` Σ_g ‖Ŵ_g Ŵ_gᵀ − I‖²_F.
    Keeps a group's directions from collapsing onto one another."""
    unit = params["W_dec"] / jnp.maximum(out.decoder_norms, 1e-12)[:, None]
    groups = unit.reshape(-1, group_size, unit.shape[-1])
    gram = jnp.einsum("gid,gjd->gij", groups, groups)
    eye = jnp.eye(group_size, dtype=gram.dtype)
    if squared:
        return jnp.sum(jnp.square(gram - eye)), {}
    return jnp.sum(jax.nn.relu(gram) * (1.0 - eye)), {}


@dataclass(frozen=True)
class MatryoshkaSample:
    n: int = 10
    """Prefix lengths drawn per step (the last is always the whole dictionary)."""
    power: float = 0.5
    """Shape a of the truncated Pareto on [1, d_sae] the lengths come from (density ∝ m^-(1+a))."""
    resolution: int = 32
    """Number of geometrically spaced block ends; a length is rounded up to the next end (so
    by at most a factor d_sae^(1/resolution), matching the heavy-tailed lengths)."""


def _matryoshka_ends(cfg: Config, term: TermConfig) -> tuple[int, ...]:
    if term.params.get("prefixes") is not None:
        return tuple(term.params["prefixes"])
    ends = geometric_ends(cfg.sae.d_sae, term.params["sample"].resolution)
    # With group terms, a sampled grid snaps to group boundaries so no group straddles a prefix.
    group = max((resolve(t).params["group_size"] for t in cfg.loss if "group_size" in t.params),
                default=1)
    return tuple(sorted({min(cfg.sae.d_sae, -(-end // group) * group) for end in ends}))


def geometric_ends(d_sae: int, n: int) -> tuple[int, ...]:
    """About n block ends from 1 to d_sae, spaced by a constant ratio d_sae^(1/n)."""
    ratio = d_sae ** (1.0 / n)
    ends = {min(d_sae, math.ceil(ratio**i - 1e-9)) for i in range(n + 1)}
    return tuple(sorted(ends | {d_sae}))


def _reach(cfg: Config, term: TermConfig) -> int:
    """How many leading latents `term` reconstructs with a weight > 0 (0 for a term that is no
    reconstruction, or whose coefficient is 0). (Fault testing: an `mse` of coefficient 0, or
    a last prefix of weight 0, was taken to train the latents past the prefixes.)"""
    term = resolve(term)
    if term.term not in RECONSTRUCTION_TERMS or not term.coefficient > 0:
        return 0
    prefixes = term.params.get("prefixes")
    if term.term == "mse" or prefixes is None:  # (sampled: always the whole)
        return cfg.sae.d_sae
    weights = term.params.get("weights") or [1.0] * len(prefixes)  # (checked by its own term)
    return max((end for end, w in zip(prefixes, weights, strict=False) if w > 0), default=0)


def _check_matryoshka(cfg: Config, term: TermConfig, key: str) -> None:
    prefixes, sample = term.params.get("prefixes"), term.params.get("sample")
    if (prefixes is None) == (sample is None):
        raise ConfigError(f"{key}: give exactly one of prefixes (fixed) or sample (random)")
    d_sae = cfg.sae.d_sae
    if prefixes is not None:
        if not prefixes or prefixes[0] < 1 or any(b <= a for a, b in pairwise(prefixes)):
            raise ConfigError(f"{key}.prefixes: must be strictly increasing and >= 1, "
                              f"got {list(prefixes)}")
        if prefixes[-1] > d_sae:
            raise ConfigError(f"{key}.prefixes: the last ({prefixes[-1]}) exceeds sae.d_sae "
                              f"({d_sae})")
        weights = term.params.get("weights")
        if weights is not None and (len(weights) != len(prefixes) or min(weights) < 0
                                    or not max(weights) > 0):
            raise ConfigError(f"{key}.weights: need {len(prefixes)} non-negative weights, one "
                              f"per prefix, not all 0, got {list(weights)}")
        end = _reach(cfg, term)
        if 0 < end < d_sae and max(_reach(cfg, t) for t in cfg.loss) < d_sae:
            # latents past the last prefix would be in no reconstruction loss: never trained,
            # yet a TopK / BatchTopK code still spends places on them
            raise ConfigError(f"{key}.prefixes: latents [{end}, {d_sae}) are in no "
                              f"reconstruction loss; end the prefixes at sae.d_sae ({d_sae}) "
                              "with a weight > 0, or add {term: mse} (coefficient > 0)")
    else:
        if term.params.get("weights") is not None:
            raise ConfigError(f"{key}.weights: only with fixed prefixes")
        if sample.n < 1 or sample.power <= 0 or sample.resolution < 1:
            raise ConfigError(f"{key}.sample: need n >= 1, power > 0 and resolution >= 1")
    group_sizes = {resolve(t).params["group_size"] for t in cfg.loss if "group_size" in t.params}
    for size in group_sizes:
        ends = _matryoshka_ends(cfg, term)
        if any(end % size for end in ends):
            raise ConfigError(f"{key}: prefix ends {list(ends)} must be multiples of the group "
                              f"terms' group_size ({size}) so no group straddles a prefix")


@register("matryoshka", check=_check_matryoshka, prefixes=_matryoshka_ends)
def matryoshka(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    prefixes: tuple[int, ...] | None = None,
    sample: MatryoshkaSample | None = None,
    weights: tuple[float, ...] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Nested reconstruction losses over prefixes of the dictionary (Matryoshka SAEs):
    Σ_j w_j · mean over tokens of ‖x − x̂_{m_j}‖², where x̂_m decodes only latents [0, m).
    Fixed `prefixes` (weights default 1/n each), or `sample`: each step n − 1 lengths drawn from
    a truncated Pareto plus the whole dictionary, weight 1/n each. All prefix reconstructions
    come from the forward pass's one block-wise decode."""
    ends = out.prefix_ends
    n_blocks = len(ends)
    if prefixes is not None:
        last_block = np.asarray([ends.index(p) for p in prefixes])
        w = jnp.asarray(weights if weights is not None else [1 / len(prefixes)] * len(prefixes))
        metrics_names = [f"mse_{p}" for p in prefixes]
    else:
        # Draw n - 1 lengths and round each up to the first block end; add the whole dictionary.
        d_sae = ends[-1]
        u = jax.random.uniform(jax.random.fold_in(out.key, _KEY_MATRYOSHKA), (sample.n - 1,))
        a = sample.power
        lengths = (1.0 - u * (1.0 - d_sae ** (-a))) ** (-1.0 / a)  # truncated Pareto, inverse CDF
        grid = jnp.asarray(ends, jnp.float32)
        slots = jnp.minimum(jnp.searchsorted(grid, jnp.ceil(lengths), side="left"), n_blocks - 1)
        last_block = jnp.concatenate([slots, jnp.asarray([n_blocks - 1])])
        w = jnp.full((sample.n,), 1.0 / sample.n)
        metrics_names = []
    selection = (jnp.arange(n_blocks)[None, :] <= last_block[:, None]).astype(out.x.dtype)
    recons = out.prefix_recons(selection)  # [n, batch, d_out], one decode
    errors = jnp.mean(jnp.sum(jnp.square(out.target[None] - recons), axis=-1), axis=-1)
    metrics = dict(zip(metrics_names, errors, strict=False))
    if prefixes is None:
        metrics["mean_prefix"] = jnp.mean(jnp.asarray(ends, jnp.float32)[last_block])
    return jnp.sum(w * errors), metrics


@jax.custom_vjp
def _self_gram(U: jax.Array) -> jax.Array:
    """U @ U.T, whose gradient is one matmul, (G + Gᵀ) @ U, where autodiff would do two."""
    return U @ U.T


def _self_gram_fwd(U):
    return U @ U.T, U


def _self_gram_bwd(U, g):
    return ((g + g.T) @ U,)


_self_gram.defvjp(_self_gram_fwd, _self_gram_bwd)


def _check_decoder_cosine(cfg: Config, term: TermConfig, key: str) -> None:
    if not -1 <= term.params.get("threshold", 0.0) < 1:
        raise ConfigError(f"{key}.threshold: must be in [-1, 1)")
    if term.params.get("chunk_size", 1) < 1:
        raise ConfigError(f"{key}.chunk_size: must be >= 1")
    if (term.params.get("exact_max") or 0) < 0:
        raise ConfigError(f"{key}.exact_max: must be >= 0")


@register("decoder_cosine", check=_check_decoder_cosine)
def decoder_cosine(
    out: sae.ForwardOutput,
    params: sae.Params,
    *,
    step: jax.Array,
    threshold: float = 0.0,
    exact_max: int | None = None,
    chunk_size: int = 1024,
) -> tuple[jax.Array, Metrics]:
    """Penalises decoder rows that point the same way: with c_ij the cosine similarity of rows
    i and j, (1/d_sae) Σ_i Σ_{j≠i} relu(c_ij − threshold)².

    Exact while d_sae ≤ `exact_max`; above, each step draws `chunk_size` random rows i and
    averages over them instead (an unbiased estimate whose cost grows linearly in d_sae). The
    exact form costs about 0.6·d_sae/batch of a dense training step, so by default
    (`exact_max: null`) it is exact while d_sae ≤ the batch size and sampled beyond."""
    unit = params["W_dec"] / jnp.maximum(out.decoder_norms, 1e-12)[:, None]
    d_sae = unit.shape[0]
    if d_sae <= (exact_max if exact_max is not None else out.x.shape[0]):
        rows, index = unit, jnp.arange(d_sae)
        cos = _self_gram(unit)
    else:
        key = jax.random.fold_in(out.key, _KEY_DECODER_COSINE)
        index = jax.random.choice(key, d_sae, (min(chunk_size, d_sae),), replace=False)
        rows = unit[index]
        cos = rows @ unit.T
    not_self = index[:, None] != jnp.arange(d_sae)[None, :]
    excess = jnp.where(not_self, jax.nn.relu(cos - threshold), 0.0)
    return jnp.sum(jnp.square(excess)) / rows.shape[0], {
        "max_cos": jnp.max(jnp.where(not_self, cos, -1.0))}
