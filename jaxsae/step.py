"""The pure training step, the part researchers edit: the train state, the optimiser and its
schedule, and `make_train_step`, which turns (state, batch, hyper-parameters) into the next
state and the step's metrics. Nothing here knows about meshes, files or the loop: `build`
jits this function with shardings, `train` runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxsae import kernels, penalties, sae
from jaxsae.config import DEAD_WINDOW_MAX, Config, OptimConfig

# The vmap axis of a sweep's SAEs.
SWEEP_AXIS = "sweep"
THRESHOLD_WINDOWS = 10
"""A run is at least this many of its running estimates' averaging windows long."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    """[] int32: number of optimizer steps taken."""
    params: sae.Params
    opt_state: optax.OptState
    tokens_since_fired: jax.Array
    """[d_sae] int32: tokens since each latent last fired (saturating)."""
    rng: jax.Array
    """Base key; the key of step s is fold_in(rng, s), so a resumed run draws the same numbers."""
    nonfinite_steps: jax.Array
    """[] int32: steps skipped because their loss or gradient was not finite."""


# ---------------------------------------------------------------------------------------------
# Optimiser and step


@flax.struct.dataclass
class Hyper:
    """The hyper-parameters a sweep may vary, as arrays given to the step: scalars for a single
    run, stacked along a leading axis (one entry per SAE) for a sweep."""

    lr: jax.Array
    """[] peak learning rate."""
    coefficients: jax.Array
    """[n_terms] loss-term coefficients."""
    k: jax.Array | None = None
    """[] int32 active latents (TopK / BatchTopK), when a sweep varies sae.k (else cfg.k)."""


def hyper_of(cfg: Config, *, with_k: bool = False) -> Hyper:
    # numpy, not jax arrays: the step embeds them as constants (a jax array closed over by a
    # multi-process jit would be a device buffer of one process).
    return Hyper(lr=np.float32(cfg.optim.lr),
                 coefficients=np.asarray([t.coefficient for t in cfg.loss], np.float32),
                 k=np.int32(cfg.sae.k) if with_k else None)


def lr_schedule(o: OptimConfig, lr: jax.Array | float | None = None
                ) -> Callable[[jax.Array], jax.Array]:
    """optax: linear warm-up over `warmup` steps (from peak/warmup at step 0 to the peak at
    step warmup-1), constant, then `decay_shape` decay to 0 over the last `decay_fraction`
    of the steps; peak `lr` (default o.lr; traced in sweeps, so the shape is built at 1)."""
    total, decay, warmup = o.total_steps, o.decay_steps, o.warmup
    warm = (optax.linear_schedule(1.0 / warmup, 1.0, max(warmup - 1, 1)) if warmup
            else optax.constant_schedule(1.0))
    cool = (optax.cosine_decay_schedule(1.0, decay) if o.decay_shape == "cosine"
            else optax.linear_schedule(1.0, 0.0, decay)) if decay else optax.constant_schedule(1.0)
    shape = optax.join_schedules([warm, optax.constant_schedule(1.0), cool],
                                 boundaries=[warmup, total - decay])
    peak = o.lr if lr is None else lr

    def schedule(step):
        return peak * shape(jnp.asarray(step, jnp.int32))

    return schedule


def make_optimizer(cfg: Config, lr: jax.Array | float | None = None
                   ) -> optax.GradientTransformation:
    """Adam with the schedule and global-norm clipping; frozen parameters get zero updates,
    learned thresholds `optim.threshold_lr_scale` times theirs. `lr`: the peak learning rate
    (default cfg.optim.lr; traced in sweeps)."""
    o = cfg.optim
    adam = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=o.adam_b1, b2=o.adam_b2),
        optax.scale_by_learning_rate(lr_schedule(o, lr)),
    )
    labels = {name: "train" if sae.is_trainable(name, cfg.sae) and name not in cfg.freeze
              else "frozen" for name in sae.param_names(cfg.sae)}
    tx = optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)
    scale = o.threshold_lr_scale
    if scale == 1.0 or labels.get("threshold") != "train":
        return tx  # (the optimiser state keeps its structure: checkpoints restore as before)
    return optax.chain(tx, optax.stateless(
        lambda updates, params=None: {**updates, "threshold": updates["threshold"] * scale}))


def schedule_at(opt_state: optax.OptState, step: jax.Array) -> optax.OptState:
    """`opt_state` with the learning-rate schedule's position set to `step`: the rate applied
    is the schedule's at the step, as logged, also after steps `optim.skip_nonfinite` skipped
    (they leave Adam's state as it was, schedule position included: fault testing found a run
    with half its steps skipped logging a decay to 0 while it trained at the peak rate)."""
    def at(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(step, node.count.dtype))
        return node

    return jax.tree.map(at, opt_state,
                        is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState))


def init_state(key: jax.Array, cfg: Config, d_in: int,
               params: sae.Params | None = None, d_out: int = 0,
               input_norm: float | None = None) -> TrainState:
    """A fresh state: random parameters, or `params` (e.g. from init_from); `d_out`: a
    transcoder's target width; `input_norm`: the inputs' typical norm as the encoder reads
    them (`sae.init_params`)."""
    init_key, state_key = jax.random.split(key)
    if params is None:
        params = sae.init_params(init_key, d_in, cfg.sae, d_out or None, input_norm)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(cfg).init(params),
        tokens_since_fired=jnp.zeros((cfg.sae.d_sae,), jnp.int32),
        rng=state_key,
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def make_train_step(
    cfg: Config, input_scale: float = 1.0, mesh: Mesh | None = None,
    sweep_axis: str | None = None, d_out: int = 0, target_scale: float = 1.0,
) -> Callable[[TrainState, jax.Array, Hyper], tuple[TrainState, dict]]:
    """The pure step: (state, batch [batch, d_in], hyper) -> (state, metrics). Batches are
    multiplied by `input_scale` (activation normalisation) on the device. A transcoder's
    batch rows are [x | target] with `d_out` target columns (targets multiplied by
    `target_scale`). A sweep vmaps this same function
    over stacked states and hypers (the batch is shared), with axis name `sweep_axis`."""
    prefix_ends = penalties.prefix_ends(cfg)
    compute = jnp.dtype(cfg.optim.compute_dtype)
    # A running estimate (BatchTopK's inference threshold) must end on the run's last
    # batches, not its first: its EMA rate is at least THRESHOLD_WINDOWS / the run's steps.
    sae_cfg = replace(cfg.sae, batchtopk_threshold_momentum=max(
        cfg.sae.batchtopk_threshold_momentum,
        min(1.0, THRESHOLD_WINDOWS / cfg.optim.total_steps)))

    def cast(tree):  # float32 master values -> the matmul dtype (a no-op for float32)
        return jax.tree.map(lambda a: a.astype(compute) if a.dtype == jnp.float32 else a, tree)

    def upcast(tree):
        return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == compute else a, tree)

    def dead_window(step: jax.Array, batch_size: int) -> jax.Array:
        # log.dead_window_tokens, or every token so far while fewer have been seen: a latent
        # silent since the start counts as dead in a run shorter than the window (which read
        # 0 dead throughout, whatever the evaluation found at the end).
        window = cfg.log.dead_window_tokens
        seen = jnp.minimum(step + 1, -(-window // batch_size)) * batch_size
        return jnp.minimum(window, seen)

    def train_step(state: TrainState, batch: jax.Array, hyper: Hyper
                   ) -> tuple[TrainState, dict]:
        target = None
        if d_out:  # a transcoder's pairs
            batch, target = batch[:, :-d_out], batch[:, -d_out:]
            if target_scale != 1.0:
                target = target * target_scale
        if input_scale != 1.0:
            batch = batch * input_scale
        step = state.step
        key = jax.random.fold_in(state.rng, step)
        schedule = lr_schedule(cfg.optim, hyper.lr)
        tx = make_optimizer(cfg, hyper.lr)

        def loss_fn(params):
            params = sae.holding(params, cfg.freeze)
            out = sae.forward(cast(params), cast(batch), cfg.sae, train=True, key=key,
                              tokens_since_fired=state.tokens_since_fired,
                              prefix_ends=prefix_ends, mesh=mesh, k=hyper.k,
                              sweep_axis=sweep_axis,
                              target=None if target is None else cast(target))
            out = upcast(out)  # loss terms in float32
            # (AuxK's value and gradient come after, in the branch its dead latents choose)
            loss, term_metrics, deferred = penalties.total_loss_deferring(
                cfg.resolved_loss, out, params, step, hyper.coefficients)
            return loss, (out, term_metrics, deferred)

        with kernels.using(cfg.optim.kernels):  # read while the step is traced
            (loss, (out, term_metrics, deferred)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(state.params)
            loss, grads, term_metrics = penalties.add_deferred(
                deferred, state.params, grads, loss, term_metrics, frozen=cfg.freeze)
        grads = sae.project_decoder_grad(state.params, grads, cfg.sae)
        updates, opt_state = tx.update(grads, schedule_at(state.opt_state, step), state.params)
        params = sae.after_update(optax.apply_updates(state.params, updates), out, step,
                                  sae_cfg)
        params = {k: state.params[k] if k in cfg.freeze else v for k, v in params.items()}

        fired = out.fired()
        since = jnp.minimum(state.tokens_since_fired + batch.shape[0], DEAD_WINDOW_MAX)
        tokens_since_fired = jnp.where(fired, 0, since)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the state as it was; the host stops the run on seeing it,
        # or, with optim.skip_nonfinite, the step is skipped and counted.
        keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = TrainState(
            step=step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            tokens_since_fired=keep(tokens_since_fired, state.tokens_since_fired),
            rng=state.rng,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        )
        wanted = batch if target is None else target
        error = jnp.sum(jnp.square(out.x_hat - wanted), axis=-1)
        # `mse` here in the normalised units training minimises; the logger puts it in the
        # data's own units, as the evaluation reports it, in float64 (`MetricLogger`; fault
        # testing: a normalised run logged an mse 200x its eval.json's under the same name,
        # and dividing by scale² here overflowed float32 for data of norm ~1e-20: mse 0)
        spread = jnp.sum(jnp.square(wanted - wanted.mean(axis=0)), axis=-1)
        metrics = {
            "loss": loss,
            **term_metrics,
            "l0": jnp.mean(out.l0()),
            "mse": jnp.mean(error),
            "explained_variance": 1.0 - jnp.sum(error) / jnp.sum(spread),
            "dead_fraction": jnp.mean(tokens_since_fired >= dead_window(step, batch.shape[0])),
            "lr": schedule(step),
            "grad_norm": grad_norm,
            "finite": finite,
            "skipped_steps": new_state.nonfinite_steps,
        }
        return new_state, metrics

    return train_step
