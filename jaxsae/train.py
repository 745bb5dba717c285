"""The training run: `train(config)`, in named phases, around one jitted `train_step`.

Phases: run directory -> data -> mesh -> abstract init -> shardings -> materialise -> step ->
restore -> loop -> export + evaluation. Every run, from the quickstart to a sharded job, takes
this path; features are configuration and registered loss terms, never a second code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxsae import evaluate, export, outputs, penalties, sae, sharding
from jaxsae.checkpoint import (
    COMMIT_MARKER,
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    Restored,
    abstract_with_shardings,
    check_resume_compatible,
)
from jaxsae.checks import check_run
from jaxsae.config import CheckpointConfig, Config, OptimConfig, sweep_label
from jaxsae.data import open_source, synthetic
from jaxsae.data.loader import Loader, Prefetcher, lanes_of_process
from jaxsae.data.source import iter_blocks
from jaxsae.data.stats import DataStats
from jaxsae.data.stats import estimate as estimate_stats
from jaxsae.errors import ConfigError, DataError, JaxsaeError, NonFiniteError
from jaxsae.outputs import AppendLog, atomic_write, json_text, write_csv
from jaxsae.parsing import list_index
from jaxsae.progress import Progress
from jaxsae.runlock import LOCK_FILE, RunLock, RunLocked

# The vmap axis of a sweep's SAEs.
SWEEP_AXIS = "sweep"
# tokens_since_fired saturates here instead of overflowing int32.
_TOKENS_SINCE_FIRED_CAP = 2**30


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


class Interrupted(JaxsaeError):
    """SIGINT / SIGTERM: a checkpoint was saved; rerunning the same command resumes."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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
    """Adam with the schedule and global-norm clipping; frozen parameters get zero updates.
    `lr`: the peak learning rate (default cfg.optim.lr; traced in sweeps)."""
    o = cfg.optim
    adam = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=o.adam_b1, b2=o.adam_b2),
        optax.scale_by_learning_rate(lr_schedule(o, lr)),
    )
    labels = {name: "train" if sae.is_trainable(name, cfg.sae) and name not in cfg.freeze
              else "frozen" for name in sae.param_names(cfg.sae)}
    return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)


def init_state(key: jax.Array, cfg: Config, d_in: int,
               params: sae.Params | None = None) -> TrainState:
    """A fresh state: random parameters, or `params` (e.g. from init_from)."""
    init_key, state_key = jax.random.split(key)
    if params is None:
        params = sae.init_params(init_key, d_in, cfg.sae)
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
    sweep_axis: str | None = None,
) -> Callable[[TrainState, jax.Array, Hyper], tuple[TrainState, dict]]:
    """The pure step: (state, batch [batch, d_in], hyper) -> (state, metrics). Batches are
    multiplied by `input_scale` (activation normalisation) on the device. A sweep vmaps this
    same function over stacked states and hypers (the batch is shared), with axis name
    `sweep_axis`."""
    prefix_ends = penalties.prefix_ends(cfg)
    compute = jnp.dtype(cfg.optim.compute_dtype)

    def cast(tree):  # float32 master values -> the matmul dtype (a no-op for float32)
        return jax.tree.map(lambda a: a.astype(compute) if a.dtype == jnp.float32 else a, tree)

    def upcast(tree):
        return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == compute else a, tree)

    def train_step(state: TrainState, batch: jax.Array, hyper: Hyper
                   ) -> tuple[TrainState, dict]:
        if input_scale != 1.0:
            batch = batch * input_scale
        step = state.step
        key = jax.random.fold_in(state.rng, step)
        schedule = lr_schedule(cfg.optim, hyper.lr)
        tx = make_optimizer(cfg, hyper.lr)

        def loss_fn(params):
            # Frozen parameters: no gradient is computed for them (XLA drops the matmuls).
            params = {k: jax.lax.stop_gradient(v) if k in cfg.freeze else v
                      for k, v in params.items()}
            out = sae.forward(cast(params), cast(batch), cfg.sae, train=True, key=key,
                              tokens_since_fired=state.tokens_since_fired,
                              prefix_ends=prefix_ends, mesh=mesh, k=hyper.k)
            out = upcast(out).replace(sweep_axis=sweep_axis)  # loss terms in float32
            loss, term_metrics = penalties.total_loss(cfg.loss, out, params, step,
                                                      hyper.coefficients)
            return loss, (out, term_metrics)

        (loss, (out, term_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        grads = sae.project_decoder_grad(state.params, grads, cfg.sae)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = sae.after_update(optax.apply_updates(state.params, updates), out, step, cfg.sae)
        params = {k: state.params[k] if k in cfg.freeze else v for k, v in params.items()}

        fired = out.fired()
        since = jnp.minimum(state.tokens_since_fired + batch.shape[0], _TOKENS_SINCE_FIRED_CAP)
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
        error = jnp.sum(jnp.square(out.x_hat - batch), axis=-1)
        spread = jnp.sum(jnp.square(batch - batch.mean(axis=0)), axis=-1)
        metrics = {
            "loss": loss,
            **term_metrics,
            "l0": jnp.mean(out.l0()),
            "mse": jnp.mean(error),
            "explained_variance": 1.0 - jnp.sum(error) / jnp.sum(spread),
            "dead_fraction": jnp.mean(tokens_since_fired >= cfg.log.dead_window_tokens),
            "lr": schedule(step),
            "grad_norm": grad_norm,
            "finite": finite,
            "skipped_steps": new_state.nonfinite_steps,
        }
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# The run


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


def build(cfg: Config, d_in: int, devices: list | None = None, input_scale: float = 1.0) -> Built:
    """mesh -> abstract init -> shardings -> jitted init and step.

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
                                 None if cfg.sweep is None else SWEEP_AXIS)
    seeds = [m.seed for m in members]

    def init_one(seed, params):
        return init_state(jax.random.PRNGKey(seed), static, d_in, params)

    if cfg.sweep is None:
        hyper = hyper_of(static)

        def init(params=None):
            return init_one(seeds[0], params)

        def step(state, batch):
            return train_step(state, batch, hyper)
    else:
        hypers = jax.tree.map(lambda *v: np.stack(v),
                              *[hyper_of(m, with_k=k_swept) for m in members])

        def init(params=None):
            return jax.vmap(init_one, in_axes=(0, None))(jnp.asarray(seeds, jnp.int32), params)

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


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    """The run directory; for an SAE of a sweep, its own directory under <run>/sweep/."""
    sae_dir: Path
    step: int
    eval: dict[str, Any]
    sweep: tuple[RunResult, ...] = ()
    """A sweep's SAEs, in the order of its points (empty for a single run)."""


def member_dirs(cfg: Config, run_dir: Path) -> list[Path]:
    """Where each SAE's config.yaml, metrics.jsonl, sae/ and eval.json go: the run directory
    itself, or run/sweep/<i> for the i-th SAE of a sweep."""
    if cfg.sweep is None:
        return [run_dir]
    n = len(cfg.sweep.points)
    width = max(2, len(str(n - 1)))
    return [run_dir / "sweep" / f"{i:0{width}d}" for i in range(n)]


def train(cfg: Config, *, progress: bool = True, log: Callable[[str], None] = print) -> RunResult:
    # -- config: what the schema cannot check alone (activation, loss terms, generator) ------
    check_run(cfg)

    # -- processes (before anything touches the devices) -------------------------------------
    launch = sharding.initialize_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    if launch and is_main:
        log(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
            f"({launch})")

    # -- run directory: one process trains in it at a time ---------------------------------
    run_dir = cfg.resolved_run_dir.absolute()
    if is_main:
        _check_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_run_dir(run_dir, is_main, log)
    try:
        return _train_locked(cfg, run_dir, progress=progress, log=log)
    finally:
        lock.release()


def _train_locked(cfg: Config, run_dir: Path, *, progress: bool,
                  log: Callable[[str], None]) -> RunResult:
    is_main = jax.process_index() == 0
    members = cfg.sweep_configs()
    dirs = member_dirs(cfg, run_dir)

    # -- data -------------------------------------------------------------------------------
    data_path = Path(cfg.data.path)
    if cfg.data.generate is not None:
        if is_main and not data_path.exists():
            log(f"{data_path} does not exist: generating it ({cfg.data.generate.get('kind')})")
            synthetic.generate(cfg.data.generate, data_path, progress=progress)
        if jax.process_count() > 1:  # every process passes here; the others wait for the data
            multihost_utils.sync_global_devices("jaxsae-generate-data")
    source = open_source(cfg.data)
    held_out = cfg.data.held_out(source.n_tokens)
    n_train = source.n_tokens - held_out
    if n_train < cfg.optim.batch_size:
        raise DataError(
            f"{data_path}: {source.n_tokens} tokens leave {max(n_train, 0)} for training after "
            f"data.eval_tokens ({held_out}); need at least optim.batch_size "
            f"({cfg.optim.batch_size})"
        )

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    try:
        for path in ckpt.set_aside:
            log(f"{path.with_suffix('')}: incomplete checkpoint (no {COMMIT_MARKER}), moved to "
                f"{path}")
        state, built, stats, loader = _run_loop(cfg, ckpt, source, n_train, run_dir, members,
                                                dirs, progress=progress, log=log)
    except BaseException:
        _close_quietly(ckpt)  # the error in flight says what went wrong, not a late save
        raise
    ckpt.close()  # waits for the last save: a failed one is this run's error
    if cfg.optim.skip_nonfinite:
        skipped = np.asarray(state.nonfinite_steps).tolist()
        log(f"skipped {skipped} steps with a non-finite loss or gradient"
            + (" (per SAE of the sweep)" if cfg.sweep is not None else ""))
    if stats.drop_above is not None:
        log(f"data: dropped {loader.dropped} tokens with norm > {stats.drop_above:.4g} "
            "in the windows read by this process")

    # -- export + evaluation -------------------------------------------------------------
    total = cfg.optim.total_steps
    params = jax.device_get(state.params)
    truth = _ground_truth(cfg, source)
    results = []
    for i, (member, directory) in enumerate(zip(members, dirs, strict=True)):
        metrics = finalise(built.member_params(params, i), member, source, n_train,
                           directory / "sae" if is_main else None, stats=stats, truth=truth)
        if is_main:
            atomic_write(directory / "eval.json", json_text(metrics))
        results.append(RunResult(run_dir=directory, sae_dir=directory / "sae", step=total,
                                 eval=metrics))
    if cfg.sweep is None:
        return results[0]
    if is_main:
        _write_sweep_table(run_dir / "sweep.csv", cfg, members, results)
    return RunResult(run_dir=run_dir, sae_dir=run_dir / "sweep", step=total, eval={},
                     sweep=tuple(results))


def _run_loop(cfg: Config, ckpt: Checkpointer, source, n_train: int, run_dir: Path,
              members: list[Config], dirs: list[Path], *, progress: bool,
              log: Callable[[str], None]) -> tuple[TrainState, Built, DataStats, Loader]:
    """restore (or init) -> the loop; returns the final state and what produced it."""
    is_main = jax.process_index() == 0

    # -- restore: the newest checkpoint that restores whole, else a fresh start ---------------
    # mesh -> abstract init -> shardings -> step are built once the input scale is known (it
    # is saved with the checkpoint, or estimated from the data for a fresh start).
    builds: dict[float, Built] = {}

    def built_for(stats: DataStats) -> Built:
        if stats.scale not in builds:
            builds[stats.scale] = build(cfg, source.d_in, input_scale=stats.scale)
        return builds[stats.scale]

    def abstract_for(loader_state: dict, saved_cfg: Config):
        check_resume_compatible(saved_cfg, cfg, run_dir)
        _check_loader_state(loader_state, cfg, source, n_train, run_dir)
        built = built_for(DataStats.from_dict(loader_state["data_stats"]))
        return abstract_with_shardings(built.abstract, built.state_sharding)

    restored = ckpt.restore_newest(abstract_for, log)
    if restored is not None:
        loader_state = restored.loader
        stats = DataStats.from_dict(loader_state["data_stats"])
        built, state = built_for(stats), restored.state
        start = int(np.max(jax.device_get(state.step)))  # a sweep: one step per SAE, all equal
        log(f"resuming {run_dir} from step {start}")
    else:
        loader_state, start = None, 0
        stats = estimate_stats(source, n_train, cfg.data)
        built = built_for(stats)
        state = built.init(_start_params(cfg, source.d_in, stats, log))
    if stats.drop_above is not None or stats.scale != 1.0:
        log(f"data: median token norm {stats.median_norm:.4g}"
            + (f", dropping tokens with norm > {stats.drop_above:.4g}" if stats.drop_above else "")
            + (f", input scale {stats.scale:.4g}" if stats.scale != 1.0 else ""))
    if is_main:
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        for member, directory in zip(members, dirs, strict=True):
            if cfg.sweep is not None:  # each SAE's directory reads like a run of its own
                directory.mkdir(parents=True, exist_ok=True)
                atomic_write(directory / "config.yaml", member.to_yaml())
            # metrics.jsonl reads like one run: lines logged after the checkpoint (or, for a
            # fresh start, by an attempt killed before its first checkpoint) are dropped.
            _truncate_metrics(directory / "metrics.jsonl", start)

    # -- loop -------------------------------------------------------------------------------
    total = cfg.optim.total_steps
    batch_size = cfg.optim.batch_size
    try:
        owned = lanes_of_process(cfg.data.lanes, jax.process_index(), jax.process_count())
    except ValueError as e:
        raise ConfigError(f"data.lanes: {e}") from None
    try:
        loader = Loader(source, batch_size=batch_size, buffer_tokens=cfg.data.shuffle_buffer,
                        seed=cfg.data.seed, stop=n_train, lanes=cfg.data.lanes,
                        owned_lanes=owned, keep=stats.keep_fn(), position=loader_state)
    except ValueError as e:
        raise DataError(f"{cfg.data.path}: {e} (fewer data.lanes would fit)") from None
    global_shape = (batch_size, source.d_in)

    def to_devices(item):  # each process hands over only its rows of the global batch
        rows, position = item
        return jax.make_array_from_process_local_data(
            built.batch_sharding, rows, global_shape), position

    batches = Prefetcher(loader.batches(), depth=2, transform=to_devices)
    position = loader.state()  # of the batches consumed so far

    def save(step: int, state: TrainState):
        saved = {**_gather_positions(position), "data_stats": stats.to_dict()}
        ckpt.save(step, state, saved, cfg)

    metrics_files = [AppendLog(d / "metrics.jsonl") for d in dirs] if is_main else []
    bar = Progress(total, initial=start, unit="step", desc=cfg.name,
                   enabled=progress and is_main)
    stop_signal = _SignalFlag()
    logger = _MetricLogger(metrics_files, bar, cfg, start, loader)
    pending = None  # (step, device metrics) of the previous step: read one step late
    try:
        for step in range(start, total):
            batch, position = next(batches)
            state, metrics = built.step(state, batch)
            if pending is not None:
                logger.record(*pending)
            pending = (step, metrics)
            done = step + 1
            if stop_signal.raised:
                logger.record(*pending)
                save(done, state)
                ckpt.wait()
                raise Interrupted(
                    f"interrupted by {stop_signal.name} at step {done}; checkpoint saved in "
                    f"{ckpt.directory}. Run the same command again to resume.",
                    128 + stop_signal.signum,
                )
            if ckpt.due(done) and done < total:
                logger.record(*pending)  # never checkpoint a state that went non-finite
                pending = None
                save(done, state)
        if pending is not None:
            logger.record(*pending)
        if start < total:
            save(total, state)
    finally:
        stop_signal.restore()
        batches.close()
        loader.close()
        bar.close()
        for file in metrics_files:
            file.close()
    return state, built, stats, loader


def _check_run_dir(run_dir: Path) -> None:
    """Refuses a run directory that is a file, or a directory jaxsae did not make (a run, a
    sweep, an import): training adds files there and must not mix them with someone else's."""
    where = f"run_dir {run_dir}"
    if run_dir.is_file() or (run_dir.exists() and not run_dir.is_dir()):
        raise ConfigError(f"{where}: is a file; give a directory (or set name:)")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    ours = ("config.yaml", "checkpoints", "metrics.jsonl", LOCK_FILE, outputs.MARKER)
    if not any((run_dir / name).exists() for name in ours):
        raise ConfigError(f"{where}: exists and is not a jaxsae run directory (no config.yaml "
                          "or checkpoints/); choose another name or run_dir")


def _lock_run_dir(run_dir: Path, is_main: bool, log: Callable[[str], None]) -> RunLock:
    """The run directory's lock, taken by process 0 for all processes of a run."""
    lock, refused = RunLock(run_dir, log), None
    if is_main:
        try:
            lock.acquire()
        except RunLocked as e:
            refused = e
    if jax.process_count() > 1:
        held = bool(multihost_utils.broadcast_one_to_all(np.asarray(refused is None)))
        if not held and refused is None:
            refused = RunLocked(f"{run_dir}: another jaxsae process is training here (see "
                                "process 0)")
    if refused is not None:
        raise refused
    return lock


def _start_params(cfg: Config, d_in: int, stats: DataStats,
                  log: Callable[[str], None]) -> sae.Params | None:
    """The parameters of init_from (None: a random init from the seed)."""
    if cfg.init_from is None:
        return None
    export.check_init_from(cfg.init_from, cfg.sae)
    params = export.initial_params(cfg.init_from, cfg.sae, d_in, stats.scale)
    if cfg.sae.decoder_norm == "unit":
        norms = np.linalg.norm(params["W_dec"], axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            raise ConfigError(f"init_from: {cfg.init_from} has decoder rows of norm "
                              f"{norms.min():.3g}..{norms.max():.3g}; use "
                              "sae.decoder_norm: free (unit would rescale them)")
    log(f"starting from {cfg.init_from}")
    return params


def _close_quietly(ckpt: Checkpointer) -> None:
    with contextlib.suppress(Exception):
        ckpt.close()


SWEEP_TABLE_METRICS = ("l0", "mse", "explained_variance", "dead_fraction")


def _write_sweep_table(path: Path, cfg: Config, members: list[Config],
                       results: list[RunResult]) -> None:
    """sweep.csv: one row per SAE: its directory, the swept values, its evaluation."""
    keys = list(dict.fromkeys(k for point in cfg.sweep.points for k in point))
    rows = [{"sae": str(result.run_dir.relative_to(path.parent)),
             **{k: _dotted_value(member, k) for k in keys},
             **{m: result.eval[m] for m in SWEEP_TABLE_METRICS}}
            for member, result in zip(members, results, strict=True)]
    write_csv(path, rows, ["sae", *keys, *SWEEP_TABLE_METRICS])


def _dotted_value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg.to_dict()
    for part in dotted.split("."):
        node = node[list_index(node, part, dotted)] if isinstance(node, list) else node[part]
    return node


def _ground_truth(cfg: Config, source) -> synthetic.Truth | None:
    """The truth of data written by `jaxsae synth` (None for other data)."""
    if not (Path(cfg.data.path) / synthetic.TRUTH_JSON).is_file():
        return None
    truth = synthetic.load_truth(cfg.data.path)
    return truth if truth.spec.tokens == source.n_tokens else None


def finalise(params: sae.Params, cfg: Config, source, n_train: int,
             out: Path | None, *, stats: DataStats | None = None, dtype: str = "float32",
             truth: synthetic.Truth | None = None, overwrite: bool = False,
             inputs: tuple = ()) -> dict[str, Any]:
    """Folds the input scale into the parameters, evaluates on the held-out tokens (else the
    last training tokens) in raw units, leaving out the tokens training dropped
    (data.drop_norm_above) — with the ground-truth metrics when `truth` is given (see
    _ground_truth) — and exports to `out`."""
    params = sae.fold_input_scale(params, 1.0 if stats is None else stats.scale)
    held_out = source.n_tokens > n_train
    eval_start = n_train if held_out else max(0, n_train - 65536)
    keep = None if stats is None else stats.keep_fn()
    dropped = 0

    def blocks():
        nonlocal dropped
        for block in iter_blocks(source, cfg.optim.batch_size, start=eval_start):
            if keep is not None:
                kept = keep(block)
                dropped += int(len(block) - kept.sum())
                block = block[kept]
            if len(block):
                yield block

    metrics = evaluate.reconstruction_metrics(params, cfg.sae, blocks())
    frequency = metrics.pop("firing_frequency")
    metrics["held_out"] = held_out
    if keep is not None:
        metrics["dropped_tokens"] = dropped
    if truth is not None:
        metrics = {**evaluate.truth_report(params, cfg.sae, source, truth, start=eval_start,
                                           batch_size=cfg.optim.batch_size), **metrics}
    if out is not None:
        export.export_sae(
            params, cfg.sae, out, dtype=dtype,
            log10_firing=evaluate.log10_firing(frequency),
            metadata={"dataset_path": str(Path(cfg.data.path).absolute()),
                      **_source_metadata(source)},
            training={"run": cfg.name, "steps": cfg.optim.total_steps,
                      "tokens": cfg.optim.total_steps * cfg.optim.batch_size,
                      "drop_norm_above": cfg.data.drop_norm_above,
                      "loss": [t.to_dict() for t in cfg.loss],
                      "optim": {"lr": cfg.optim.lr, "batch_size": cfg.optim.batch_size}},
            overwrite=overwrite, inputs=inputs,
        )
    return metrics


def export_checkpoint(path: str | Path, out: str | Path, *, step: int | None = None,
                      dtype: str = "float32", data: str | None = None, overwrite: bool = False,
                      log: Callable[[str], None] = print) -> Path:
    """Exports a checkpointed SAE (a run directory or its checkpoints/) in SAELens layout to
    `out`; a sweep's SAEs go to out/sweep/<i>/. Without `step`, the newest checkpoint that
    restores: a damaged one is skipped with a message (and set aside as `<step>.corrupt`
    unless a training process holds the run)."""
    path = Path(path)
    directory = path if path.name == "checkpoints" else path / "checkpoints"
    if not directory.is_dir():
        raise JaxsaeError(f"{path}: no checkpoints/ directory (expected a run directory)")
    run_dir = directory.parent
    lock = RunLock(run_dir, log)
    try:  # holding the lock (no training in progress), export may tidy the run directory
        lock.acquire()
        read_only = False
    except (RunLocked, OSError):
        read_only = True
    try:
        restored, cfg, built, source = _restore_for_export(directory, step, data, read_only,
                                                           log)
    finally:
        lock.release()
    n_train = max(source.n_tokens - cfg.data.held_out(source.n_tokens), 0)
    stats = DataStats.from_dict(restored.loader["data_stats"])
    params = jax.device_get(restored.state.params)
    truth = _ground_truth(cfg, source)
    inputs = (run_dir, cfg.data.path)
    if cfg.sweep is None:
        finalise(params, built.members[0], source, n_train, Path(out), stats=stats,
                 dtype=dtype, truth=truth, overwrite=overwrite, inputs=inputs)
        return Path(out)
    # A sweep exports every SAE, to OUT/sweep/<i> (the layout of its run directory).
    with outputs.staged_directory(out, "sweep-export", overwrite=overwrite,
                                  inputs=inputs) as staging:
        for i, (member, member_dir) in enumerate(
                zip(built.members, member_dirs(cfg, staging), strict=True)):
            finalise(built.member_params(params, i), member, source, n_train, member_dir,
                     stats=stats, dtype=dtype, truth=truth)
    return Path(out)


def _restore_for_export(directory: Path, step: int | None, data: str | None, read_only: bool,
                        log: Callable[[str], None]) -> tuple[Restored, Config, Built, Any]:
    """The checkpoint to export (restored onto one device, whatever mesh the run used), its
    config (data.path replaced by `data`), the build it restored into, and the data."""
    ckpt = Checkpointer(directory, CheckpointConfig(), read_only=read_only)
    found: dict[str, Any] = {}

    def abstract_for(loader_state: dict, cfg: Config):
        if data is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data))
        source = open_source(cfg.data)
        one = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, model=1))
        built = build(one, source.d_in, jax.devices()[:1])
        found.update(cfg=cfg, built=built, source=source)
        return abstract_with_shardings(built.abstract, built.state_sharding)

    try:
        steps = ckpt.steps()
        if not steps:
            raise JaxsaeError(f"{directory}: no complete checkpoint")
        if step is None:
            restored = ckpt.restore_newest(abstract_for, log)
            if restored is None:
                raise CheckpointError(f"{directory}: no checkpoint restores (each one skipped "
                                      "is named above)")
        elif step not in steps:
            raise JaxsaeError(f"--step {step}: no such checkpoint in {directory} "
                              f"(available: {', '.join(map(str, steps))})")
        else:
            try:
                loader_state, cfg = ckpt.restore_meta(step)
                restored = ckpt.restore(step, abstract_for(loader_state, cfg))
            except CorruptCheckpoint as e:
                raise CheckpointError(f"{directory}: {e}") from None
    finally:
        ckpt.close()
    return restored, found["cfg"], found["built"], found["source"]


def _source_metadata(source) -> dict[str, Any]:
    src = getattr(getattr(source, "manifest", None), "source", {}) or {}
    out = {}
    if "model" in src:
        out["model_name"] = src["model"]
    if "hook" in src:
        out["hook_name"] = src["hook"]
    if "context" in src:  # written by `jaxsae cache`: how the windows were built
        out["context_size"] = src["context"]
        out["prepend_bos"] = src.get("prepend_bos", True)
        out["drop_first_position"] = src.get("drop_first_position", True)
    return out


def _gather_positions(position: dict) -> dict:
    """The loader position with every process's lanes filled in (process 0 writes it)."""
    if jax.process_count() == 1:
        return position
    lanes = np.asarray([p if p is not None else [-1, -1, -1] for p in position["lanes"]])
    merged = multihost_utils.process_allgather(lanes).max(axis=0)
    return {**position, "lanes": merged.tolist()}


def _check_loader_state(state: dict, cfg: Config, source, n_train: int, where: Path) -> None:
    if state.get("n_lanes") != cfg.data.lanes:
        raise JaxsaeError(f"{where}: the checkpoint used data.lanes {state.get('n_lanes')}, "
                          f"the config says {cfg.data.lanes}")
    if state.get("d_in") != source.d_in:
        raise DataError(f"{cfg.data.path}: d_in is {source.d_in} but the checkpoint in {where} "
                        f"was trained on d_in {state.get('d_in')}")
    if state.get("n_tokens") != n_train or state.get("batch_size") != cfg.optim.batch_size:
        raise JaxsaeError(
            f"{where}: the data changed since the checkpoint (it was {state.get('n_tokens')} "
            f"training tokens in batches of {state.get('batch_size')}, now {n_train} in "
            f"{cfg.optim.batch_size}); resuming would not see the same batches"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops lines logged after the checkpoint, so the resumed file reads like one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill
    atomic_write(path, "".join(k + "\n" for k in kept))


class _MetricLogger:
    """Turns the device metrics of a step (fetched one step late) into logs and checks: one
    metrics.jsonl per SAE (a sweep's metrics have a leading SAE axis)."""

    def __init__(self, files: list, bar, cfg: Config, start: int, loader: Loader):
        self.files, self.bar, self.cfg, self.loader = files, bar, cfg, loader
        self.last_time, self.last_step = time.perf_counter(), start
        self.labels = penalties.term_labels(cfg.loss)
        self.points = cfg.sweep.points if cfg.sweep is not None else None

    def record(self, step: int, metrics: dict) -> None:
        fetched = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        n = 1 if self.points is None else len(self.points)
        hosts = [{k: (v if self.points is None else v[i]).item() for k, v in fetched.items()}
                 for i in range(n)]
        done = step + 1
        for i, host in enumerate(hosts):
            if not host.pop("finite") and not self.cfg.optim.skip_nonfinite:
                bad = [label for label in self.labels
                       if not math.isfinite(host.get(f"loss.{label}", 0.0))]
                culprit = f"term(s) {', '.join(bad)}" if bad else "the gradient"
                which = ("" if self.points is None
                         else f" of sweep SAE {i} ({sweep_label(self.points[i])})")
                raise NonFiniteError(
                    f"non-finite loss or gradient{which} at step {step} ({culprit} non-finite: "
                    f"loss={host['loss']}, grad_norm={host['grad_norm']}); the last good "
                    "checkpoint is kept. Lower optim.lr or check the data "
                    "(data.check_finite: true)"
                )
        self.bar.update(done - self.bar.n)
        now = time.perf_counter()
        if done % self.cfg.log.every_steps and done != self.cfg.optim.total_steps:
            return
        tokens_per_s = (done - self.last_step) * self.cfg.optim.batch_size / (now - self.last_time)
        self.last_time, self.last_step = now, done
        self.bar.set_postfix(_postfix(done * self.cfg.optim.batch_size, tokens_per_s, hosts),
                             refresh=False)
        for host, file in zip(hosts, self.files, strict=False):  # no files: not process 0
            if not self.cfg.optim.skip_nonfinite:
                host.pop("skipped_steps")
            line = {"step": done, "tokens": done * self.cfg.optim.batch_size,
                    "tokens_per_s": round(tokens_per_s, 1), **host}
            if self.cfg.data.drop_norm_above is not None:
                line["dropped_tokens"] = self.loader.dropped
            # NaN / inf (skipped steps) are written as null: strict JSON. A line is written
            # whole or not at all (disk full).
            file.write_line(json_text(line, indent=None))


def _postfix(tokens: int, tokens_per_s: float, hosts: list[dict]) -> dict[str, str]:
    """Progress-bar figures: the values of a single run, the range over a sweep's SAEs."""

    def show(key: str, fmt: str) -> str:
        values = [h[key] for h in hosts]
        lo, hi = min(values), max(values)
        return format(lo, fmt) if lo == hi else f"{lo:{fmt}}..{hi:{fmt}}"

    return {"tokens": f"{tokens:,}", "tok/s": f"{tokens_per_s:,.0f}",
            "loss": show("loss", ".4g"),
            "L0": show("l0", ".1f"), "EV": show("explained_variance", ".3f")}


class _SignalFlag:
    """SIGINT / SIGTERM set a flag the loop checks after each step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step{again}",
              file=sys.stderr)

    @property
    def raised(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
