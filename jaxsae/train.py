"""The training run: `train(config)`, in named phases around one jitted step.

Phases: config checks -> run directory (locked) -> data -> restore or initialise (mesh ->
abstract init -> shardings -> materialise, in `jaxsae.build`) -> loop -> evaluation + export
(`jaxsae.finish`). Every run, from the quickstart to a sharded job, takes this path; features
are configuration, registered activations and loss terms, never a second code path. The step
itself is in `jaxsae.step`; what the loop reports to in `jaxsae.hooks` (metrics files,
progress, and any `LoopHook` the caller passes); signals in `jaxsae.interrupts`; keeping
several processes in step in `jaxsae.processes`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxsae import export, outputs, processes, sae
from jaxsae.build import Built, build
from jaxsae.checkpoint import (
    COMMIT_MARKER,
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    abstract_with_shardings,
    check_resume_compatible,
    foreign_steps,
)
from jaxsae.checks import check_run
from jaxsae.config import (
    CheckpointConfig,
    Config,
    changes_of,
    config_from_dict,
    default_loss,
    load_config,
)
from jaxsae.curves import CurvesHook
from jaxsae.data import open_source, synthetic
from jaxsae.data.generated import refuse_other_sampler
from jaxsae.data.loader import Loader, Prefetcher, dropped_tokens, lanes_of_process
from jaxsae.data.source import fingerprint
from jaxsae.data.stats import DataStats, check_held_out, check_held_out_kept
from jaxsae.data.stats import estimate as estimate_stats
from jaxsae.errors import ConfigError, DataError, JaxsaeError
from jaxsae.finish import finalise_all, ground_truth, member_dirs, write_sweep_table
from jaxsae.hooks import (
    Interrupted,
    LoopHook,
    MetricLogger,
    MetricsFiles,
    ProgressDisplay,
    truncate_metrics,
)
from jaxsae.interrupts import SignalFlag
from jaxsae.outputs import atomic_write, json_text
from jaxsae.progress import Progress
from jaxsae.runlock import DirectoryTimes, RunLock, RunLocked
from jaxsae.step import TrainState
from jaxsae.trackers import trackers


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    """The run directory; for an SAE of a sweep, its own directory under <run>/sweep/."""
    sae_dir: Path
    step: int
    eval: dict[str, Any]
    sweep: tuple[RunResult, ...] = ()
    """A sweep's SAEs, in the order of its points (empty for a single run)."""
    skipped_steps: int = 0
    """Of `step`, those `optim.skip_nonfinite` skipped (a non-finite loss or gradient)."""


def train(cfg: Config, *, progress: bool = True, log: Callable[[str], None] = print,
          make_loader: Callable[..., Loader] = Loader,
          hooks: Sequence[LoopHook] = (), resume_as_trained: bool = True) -> RunResult:
    """Trains (or resumes) the run `cfg` describes and returns where its results are.
    `resume_as_trained`: keys `cfg` leaves to `auto` take the values the run's checkpoints
    were trained with (`_as_checkpointed`); False: they are compared as if set (`sae.init_l0`
    is the start's either way).
    `make_loader`: builds the batch loader from `Loader`'s arguments (tests wrap it to see or
    cut the stream of batches). `hooks`: told every step, logged metrics and checkpoint, after
    metrics.jsonl and the progress display (see `jaxsae.hooks.LoopHook`)."""
    # -- processes (before anything touches the devices) -------------------------------------
    launch = processes.initialize_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    if not is_main:  # process 0 reports for the run (errors are raised on every process)
        log = _silent
    if launch:
        log(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
            f"({launch})")

    # -- config: what the schema cannot check alone (activation, loss terms, generator); a
    # process that meets an error stops every process (fault testing: the others waited)
    processes.on_every_process(lambda: check_run(cfg))
    if launch:
        _agree_on_config(cfg)

    # -- run directory: one process trains in it at a time ---------------------------------
    run_dir = outputs.canonical(cfg.resolved_run_dir)  # `..` resolved

    def make() -> _Made | None:
        _check_start_dir(cfg, run_dir)
        return _make_run_dir(run_dir)

    created = processes.on_process_0(make)
    lock, remade = _lock_run_dir(run_dir, is_main, log, make)
    created = remade or created
    try:
        cfg, notes = _as_checkpointed(cfg, run_dir, defaulted=resume_as_trained)
        if launch:  # (each process read the same checkpoint; checked as at the start)
            _agree_on_config(cfg)
        return _train_locked(cfg, run_dir, progress=progress, log=log, make_loader=make_loader,
                             hooks=hooks, notes=notes)
    finally:
        _remove_if_unused(run_dir, created, lock)
        # (a lock file this call made goes with it: a refused start leaves a run as it was)
        lock.discard() if lock.created else lock.release()


def _silent(message: str) -> None:
    pass


def check_start(cfg: Config) -> None:
    """Refuses, writing nothing, what train() would refuse before its first step about the run
    directory (`_check_start_dir`) and the data (`_open_data`; data that data.generate is still
    to write is checked once written, its size before): train() makes the same checks, this
    function is for callers that start several runs (`jaxsae bench` checks every arm before
    the first trains; fault testing: an arm was refused only after the arms before it had
    trained). The config's own checks are `check_run`'s; a resume's comparison with the
    checkpoints is the restore's."""
    _check_start_dir(cfg, outputs.canonical(cfg.resolved_run_dir))
    if cfg.data.stream or cfg.data.generate is None or Path(cfg.data.path).exists():
        _open_data(cfg)
    else:
        _check_size_to_generate(cfg)


def _check_size_to_generate(cfg: Config) -> None:
    """Refuses, before data.generate writes data.path, a size that leaves less than a batch
    for training after the held-out tokens, naming data.generate.tokens (fault testing: the
    data was written, then the run refused, and the directory left behind refused the corrected
    config too, as holding too few tokens)."""
    _, spec = synthetic.parse_spec(cfg.data.generate, key="data.generate")
    cfg.data.training_tokens(spec.tokens, cfg.optim.batch_size, where="data.generate.tokens")


def _as_checkpointed(cfg: Config, run_dir: Path, *, defaulted: bool = True
                     ) -> tuple[Config, list[str]]:
    """A resumed run keeps how it started: `sae.init_l0` as its newest readable checkpoint
    has it (it sets the first step alone, so a resume neither changes nor compares it; a
    value the config sets otherwise is said). With `defaulted`, keys left to `auto`
    (`Config.defaulted`) keep the values the checkpoint was trained with where `auto` now
    gives others (a run started under older defaults resumes as it was trained instead of
    being refused); with the note that says so, for once the restore goes ahead. A key the
    config sets is compared as before (`check_resume_compatible`). A fresh start is what
    `_rows_of_start` makes of the config; a resume of free rows that auto gave a start is
    what `_with_free_rows` makes of it."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return _rows_of_start(cfg)
    trained = None
    try:  # (what cannot be read here, the restore reads and reports after)
        ckpt = Checkpointer(directory, CheckpointConfig(), read_only=True)
        try:
            for step in reversed(ckpt.steps()):
                with contextlib.suppress(CorruptCheckpoint):
                    trained = ckpt.restore_meta(step)[1]
                    break
        finally:
            ckpt.close()
    except Exception:  # (orbax raises many types for damaged directories)
        trained = None
    if trained is None:
        return _rows_of_start(cfg)
    notes: list[str] = []
    as_trained = as_started_from(cfg, trained)
    if as_trained is not cfg:
        cfg = as_trained
        notes.append(f"{run_dir}: resuming with free decoder rows, as its checkpoints were "
                     "trained (sae.decoder_norm left to auto, with init_from); set "
                     "sae.decoder_norm to choose")
    tree, saved, kept = cfg.to_dict(), trained.to_dict(), []
    started = saved["sae"]["init_l0"]
    if tree["sae"]["init_l0"] != started:  # (a review: refused, though nothing would differ)
        if "sae.init_l0" not in cfg.defaulted:
            notes.append(f"{run_dir}: sae.init_l0 {_brief(tree['sae']['init_l0'])} sets a "
                         f"start, and the run started with {_brief(started)}: kept")
        tree["sae"]["init_l0"] = started
    # (loss terms' `auto` ramps compared at the checkpoint's length, as the restore does)
    steps = trained.optim.total_steps
    as_run = [c.ramped_for(steps).to_dict() for c in (cfg, trained)]
    for key in [k for k in cfg.defaulted if k != "sae.init_l0"]:
        # (`sae.decoder_norm`, `data.normalize`, `loss`; kept only with `defaulted`)
        *section, name = key.split(".")
        mine, theirs, now, then = ((t[section[0]] for t in (tree, saved, *as_run)) if section
                                   else (tree, saved, *as_run))
        if defaulted and now[name] != then[name]:
            kept.append(f"{key}: {_brief(theirs[name])} (auto now gives {_brief(mine[name])})")
            mine[name] = theirs[name]
        else:  # (still auto: resolved again, and known to be)
            mine[name] = None if key == "loss" else "auto"
    if not kept and tree["sae"]["init_l0"] == cfg.sae.init_l0:
        return cfg, notes
    for key in cfg.follows:  # (still auto: derived again, and known to be)
        section, _, name = key.partition(".")
        tree[section][name] = "auto"
    try:
        resumed = config_from_dict(tree)
        check_run(resumed)
    except JaxsaeError:  # (the restore's comparison says what differs)
        return cfg, notes
    if kept:
        notes.append(f"{run_dir}: resuming as its checkpoints were trained, with "
                     + ", ".join(kept)
                     + f"; set {'them' if len(kept) > 1 else 'it'} in the config to choose")
    return resumed, notes


def _starts_free(cfg: Config) -> bool:
    """Whether `sae.decoder_norm: auto` could give this run free rows for its `init_from`
    start (auto gave unit rows, which a start's rows of several lengths cannot take)."""
    return (cfg.init_from is not None and "sae.decoder_norm" in cfg.defaulted
            and cfg.sae.decoder_norm == "unit" and not cfg.sae.transcoder)


def as_started_from(cfg: Config, trained: Config) -> Config:
    """`cfg` as auto gave it to the run that trained `trained` from its `init_from` start:
    free rows (`_with_free_rows`) where auto now gives unit ones and the run trained free,
    whatever the start is now (gone, or replaced: fault testing); else `cfg` itself. A resume
    compares with this (`_as_checkpointed`), and so does `jaxsae bench` when it reuses a
    finished arm (fault testing: such arms were trained again on every rerun)."""
    if _starts_free(cfg) and trained.sae.decoder_norm == "free":
        return _with_free_rows(cfg)
    return cfg


def _rows_of_start(cfg: Config) -> tuple[Config, list[str]]:
    """A fresh start from `init_from` with `sae.decoder_norm` left to auto keeps the start's
    decoder rows free when they cannot be made unit (rows of several lengths: a SAELens
    standard SAE), where the activation allows free rows, with the loss terms for free rows
    (`_with_free_rows`) and a note that says so. (Since 0.3.0 auto gives a ReLU unit rows,
    which refused such a start.) A resume takes what its checkpoint trained with instead
    (`_as_checkpointed`): the start may be gone or replaced by then."""
    if not _starts_free(cfg):
        return cfg, []
    try:
        norms = export.start_rows(cfg.init_from, cfg.sae)
    except JaxsaeError:  # (the start's own checks say it where the start is read)
        return cfg, []
    if norms is None:
        return cfg, []
    started = _with_free_rows(cfg)
    try:  # (matching pursuit needs unit rows: the start's refusal says so)
        check_run(started)
    except JaxsaeError:
        return cfg, []
    terms = _brief(started.to_dict()["loss"])
    swept = sorted({key for point in (cfg.sweep.points if cfg.sweep else ())
                    for key in point if key.startswith("loss.")})
    if swept:  # (fault testing: the base's coefficient read as the one trained)
        terms += f" (the sweep sets {', '.join(swept)})"
    loss = (f", with the loss for free rows {terms}" if "loss" in cfg.defaulted
            else f", with the loss edited from the default terms for free rows {terms}"
            if cfg.loss_made_from else "")
    return started, [f"init_from: {cfg.init_from} has decoder rows of norm {norms}: "
                     f"sae.decoder_norm auto keeps them free{loss}; set sae.decoder_norm to "
                     "choose"]


def _with_free_rows(cfg: Config) -> Config:
    """`cfg` with free decoder rows where auto gave unit ones, and the loss terms auto gives
    free rows: the default terms for free rows when the config gives no `loss`; when
    overrides edited the default terms, each value the edit left as the unit rows' default
    becomes the free rows' (fault testing: `loss.1.warmup_steps=0` kept the unit rows' L1
    coefficient). The other keys left to auto stay so."""
    tree = cfg.to_dict()
    tree["sae"]["decoder_norm"] = "free"
    for key in cfg.defaulted:
        *section, name = key.split(".")
        if key == "loss":
            tree["loss"] = None
        elif key != "sae.decoder_norm":
            (tree[section[0]] if section else tree)[name] = "auto"
    for key in cfg.follows:
        section, _, name = key.partition(".")
        tree[section][name] = "auto"
    if cfg.loss_made_from and "loss" not in cfg.defaulted:
        unit, free = (default_loss(cfg.sae.activation, rows) for rows in ("unit", "free"))
        edits = set(cfg.loss_edits)
        for i, (mine, u, f) in enumerate(zip(cfg.loss, unit, free, strict=False)):
            if mine.term == u.term == f.term and not {"loss", f"loss.{i}"} & edits:
                for name, value in f.to_dict().items():
                    # (a value given equal to the unit rows' default is kept: fault testing)
                    if (f"loss.{i}.{name}" not in edits
                            and tree["loss"][i].get(name) == u.to_dict().get(name) != value):
                        tree["loss"][i][name] = value
    return config_from_dict(tree)


def _brief(value: Any) -> str:
    """A value of a defaulted key as a note shows it (loss terms: `[mse, l1 5 ramped over 19
    steps]`)."""
    if isinstance(value, list):
        return "[" + ", ".join(f"{t['term']}" + (f" {t['coefficient']:g}" if t.get(
            "coefficient", 1.0) != 1.0 else "") + (
                "" if not t.get("warmup_steps") else " ramped over 5 % of the run"
                if t["warmup_steps"] == "auto" else f" ramped over {t['warmup_steps']} steps")
            for t in value) + "]"
    return "null" if value is None else str(value)


# Keys the processes of a run may set apart: where each finds the same data (checked by
# content, `_agree_on_data`), and how each was launched.
_PER_PROCESS_KEYS = ("data.path", "data.target", "distributed")


def _agree_on_config(cfg: Config) -> None:
    """Every process of a run was given the same config (bar `_PER_PROCESS_KEYS`)."""
    mine = cfg.to_dict()
    for key in _PER_PROCESS_KEYS:
        section, _, name = key.rpartition(".")
        (mine[section] if section else mine).pop(name, None)
    if cfg.data.generate is not None:  # as the generator resolves it (fault testing: "seed is
        # 1 there, None on process 0", which drew seed 0)
        mine["data"]["generate"] = _generator_settings(cfg)

    def differences(theirs: str) -> str | None:
        other = json.loads(theirs)
        changes = changes_of(mine, other)
        if not changes:
            return None
        more = (f" (and {len(changes) - 1} more key{'s' if len(changes) > 2 else ''})"
                if len(changes) > 1 else "")
        key, here, there = changes[0]
        return f"{key} is {here!r} there, {there!r} on process 0{more}"

    processes.agree(json.dumps(mine, sort_keys=True), differences)


def _agree_on_data(cfg: Config, source, digest: str) -> None:
    """Every process of a run reads the same data: the same number of tokens of the same
    width, and the same `fingerprint` (values of rows evenly spaced over the tokens)."""
    if jax.process_count() == 1:
        return
    n = source.n_tokens
    mine = f"{n:,} tokens {getattr(source, 'width', source.d_in)} wide, rows {digest}"
    processes.agree(mine, lambda theirs: None if theirs == mine else (
        f"data.path {cfg.data.path} holds other data there ({mine}; on process 0: {theirs})"))


def _remove_if_unused(run_dir: Path, created: _Made | None, lock: RunLock) -> None:
    """Removes the run directory this call created if it holds nothing but its lock (and
    empty directories: the checkpoints' before the first save), and the directories above it
    this call created (`created`, the topmost: runs/ for runs/NAME), if empty: the run stopped
    before writing anything (bad data, say), and leaves no trace. The lock file goes while the
    lock is held (`RunLock.discard`)."""
    if created is None or not lock.held:  # (not held: another process's, and what is there)
        return
    with contextlib.suppress(OSError):
        if not outputs.holds_only_a_lock(run_dir):
            return
        entries = sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True)
        lock.discard()
        for directory in entries:  # deepest first; each is empty by then
            if directory.is_dir():
                directory.rmdir()
        for directory in (run_dir, *run_dir.parents):
            untouched = (directory == created.top and created.times is not None
                         and created.times.untouched())
            directory.rmdir()  # (one that is not empty stops it: OSError)
            if directory == created.top:
                if untouched:
                    created.times.restore()
                break


def _train_locked(cfg: Config, run_dir: Path, *, progress: bool, log: Callable[[str], None],
                  make_loader: Callable[..., Loader], hooks: Sequence[LoopHook],
                  notes: Sequence[str] = ()) -> RunResult:
    members = cfg.sweep_configs()
    dirs = member_dirs(cfg, run_dir)

    # -- data -------------------------------------------------------------------------------
    data_path = Path(cfg.data.path)
    if cfg.data.generate is not None and not cfg.data.stream:
        def generate():  # the other processes wait for the data (or process 0's error)
            if not data_path.exists():
                _check_size_to_generate(cfg)
                log(f"{data_path} does not exist: generating it "
                    f"({cfg.data.generate.get('kind')})")
                synthetic.generate(cfg.data.generate, data_path, progress=progress)

        processes.on_process_0(generate)

    # (data only one process cannot open)
    source, n_train = processes.on_every_process(lambda: _open_data(cfg))
    digest = None  # (streamed data is its config's data.generate)
    if not cfg.data.stream:
        digest = fingerprint(source)
        _agree_on_data(cfg, source, digest)
    held_out = cfg.data.held_out(source.n_tokens)
    # said once the run is known to go ahead (fault testing: before a resume's one-line
    # refusal, they made it three lines)
    notes = list(notes)
    if cfg.data.stream:
        notes.append(f"data: streaming {cfg.data.generate.get('kind')} ({source.n_tokens} "
                     f"tokens, {held_out} held out for evaluation; nothing is written)")
    # the truth read (and checked) now, not after the training
    truth = processes.on_every_process(lambda: ground_truth(cfg, source, notes.append))

    told: list[LoopHook] = []  # filled by the loop; closed once evaluation is done too
    try:
        return _train_and_finish(cfg, run_dir, source, n_train, members, dirs, told,
                                 progress=progress, log=log, make_loader=make_loader,
                                 hooks=hooks, truth=truth, digest=digest, notes=notes)
    except BaseException as error:
        for hook in told:
            hook.on_failure(error)
        raise
    finally:
        for hook in told:
            hook.close()


def _open_data(cfg: Config) -> tuple[Any, int]:
    """The run's data, opened (with data.generate, checked to be what it generates), and its
    tokens left for training; refuses data that leaves less than a batch for training after
    the held-out tokens, and held-out tokens the evaluation at the end would refuse
    (`check_held_out`: checked now, not after training)."""
    data_path = Path(cfg.data.path)
    source = open_source(cfg.data, train_tokens=cfg.optim.total_tokens)
    if cfg.data.generate is not None and not cfg.data.stream:
        synthetic.check_generated(source, cfg.data.generate, data_path)
    n_train = cfg.data.training_tokens(
        source.n_tokens, cfg.optim.batch_size,
        where="data.generate.tokens" if cfg.data.stream else data_path)
    if cfg.data.held_out(source.n_tokens) and not cfg.data.stream:
        check_held_out(source, n_train, cfg.data)
    return source, n_train


def _times(ratio: float) -> str:
    """1.79 or 1,786: three figures, and no exponent (fault testing: "1.79e+03 times")."""
    return f"{ratio:.3g}" if ratio < 100 else f"{ratio:,.0f}"


def _train_and_finish(cfg: Config, run_dir: Path, source, n_train: int, members: list[Config],
                      dirs: list[Path], told: list[LoopHook], *, progress: bool,
                      log: Callable[[str], None], make_loader: Callable[..., Loader],
                      hooks: Sequence[LoopHook], truth: synthetic.Truth | None,
                      digest: str | None, notes: Sequence[str] = ()) -> RunResult:
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    try:
        for path in ckpt.set_aside:
            log(f"{path.with_suffix('')}: incomplete checkpoint (no {COMMIT_MARKER}), moved to "
                f"{path}")
        state, built, stats, dropped = _run_loop(cfg, ckpt, source, n_train, run_dir, members,
                                                dirs, told, progress=progress, log=log,
                                                make_loader=make_loader, hooks=hooks,
                                                digest=digest, notes=notes)
    except BaseException:
        _close_quietly(ckpt)  # the error in flight says what went wrong, not a late save
        raise
    ckpt.close()  # waits for the last save: a failed one is this run's error
    if cfg.optim.skip_nonfinite:
        skipped = np.asarray(state.nonfinite_steps).tolist()
        log(f"skipped {skipped} steps with a non-finite loss or gradient"
            + (" (per SAE of the sweep)" if cfg.sweep is not None else ""))
    if stats.drop_above is not None and dropped is not None:
        log(f"data: dropped {dropped} tokens with norm > {stats.drop_above:.4g}")

    # -- export + evaluation -------------------------------------------------------------
    total = cfg.optim.total_steps
    params = jax.device_get(state.params)
    evaluations = finalise_all(
        [(built.member_params(params, i), member, directory / "sae" if is_main else None)
         for i, (member, directory) in enumerate(zip(members, dirs, strict=True))],
        source, n_train, stats=stats, truth=truth,  # the held-out tokens read once for all
        progress=progress and is_main, data_digest=digest)
    results = []
    # per SAE (fault testing: one SAE of a sweep that skipped 31 of its 32 steps was reported
    # as "trained 32 steps", its sweep.csv row like any other's)
    skipped = np.broadcast_to(np.asarray(jax.device_get(state.nonfinite_steps)), (len(dirs),))
    for i, (directory, metrics) in enumerate(zip(dirs, evaluations, strict=True)):
        if is_main:
            atomic_write(directory / "eval.json", json_text(metrics))
        for hook in told:
            hook.on_evaluation(i, metrics)
        results.append(RunResult(run_dir=directory, sae_dir=directory / "sae", step=total,
                                 eval=metrics, skipped_steps=int(skipped[i])))
    if cfg.sweep is None:
        return results[0]
    if is_main:
        write_sweep_table(run_dir / "sweep.csv", cfg, members, dirs,
                          [r.eval for r in results],
                          [r.skipped_steps for r in results] if cfg.optim.skip_nonfinite
                          else None)
    return RunResult(run_dir=run_dir, sae_dir=run_dir / "sweep", step=total, eval={},
                     sweep=tuple(results))


def _run_loop(cfg: Config, ckpt: Checkpointer, source, n_train: int, run_dir: Path,
              members: list[Config], dirs: list[Path], told: list[LoopHook], *, progress: bool,
              log: Callable[[str], None], make_loader: Callable[..., Loader],
              hooks: Sequence[LoopHook], digest: str | None = None,
              notes: Sequence[str] = ()) -> tuple[TrainState, Built, DataStats, Loader]:
    """restore (or init) -> the loop; returns the final state and what produced it. The
    hooks it tells are added to `told`. `digest`: the data's `fingerprint` (None: streamed),
    saved with each checkpoint and compared on restore; `notes`: lines to log once the
    restore (or a fresh start) is known to go ahead."""
    is_main = jax.process_index() == 0
    try:  # before anything is written
        owned = lanes_of_process(cfg.data.lanes, jax.process_index(), jax.process_count())
    except ValueError as e:
        raise ConfigError(f"data.lanes: {e}") from None

    # -- restore: the newest checkpoint that restores whole, else a fresh start ---------------
    # mesh -> abstract init -> shardings -> step are built once the input scale is known (it
    # is saved with the checkpoint, or estimated from the data for a fresh start).
    builds: dict[tuple, Built] = {}

    def built_for(stats: DataStats) -> Built:
        scales = (stats.scale, stats.target_scale, stats.median_norm)
        if scales not in builds:
            builds[scales] = build(cfg, source.d_in, input_scale=stats.scale,
                                   d_out=source.d_out, target_scale=stats.target_scale,
                                   input_norm=stats.median_norm * stats.scale)
        return builds[scales]

    def abstract_for(loader_state: dict, saved_cfg: Config):
        check_resume_compatible(saved_cfg, cfg, run_dir)
        _check_stream_unchanged(saved_cfg, cfg, run_dir)
        _check_loader_state(loader_state, cfg, source, n_train, run_dir)
        _check_same_data(loader_state, digest, cfg, run_dir)
        built = built_for(DataStats.from_dict(loader_state["data_stats"]))
        return abstract_with_shardings(built.abstract, built.state_sharding)

    restored = ckpt.restore_newest(abstract_for, log)
    if restored is not None:
        loader_state = restored.loader
        stats = DataStats.from_dict(loader_state["data_stats"])
        built, state = built_for(stats), restored.state
        start = int(np.max(jax.device_get(state.step)))  # a sweep: one step per SAE, all equal
        if start > cfg.optim.total_steps:  # the SAE is already past the end the config sets
            raise ConfigError(
                f"optim.total_tokens: {cfg.optim.total_tokens} tokens "
                f"({cfg.optim.total_steps} steps) is less than the {start} steps "
                f"({start * cfg.optim.batch_size} tokens) {run_dir} has already trained; "
                "export an earlier checkpoint with jaxsae export --step instead")
        log(f"resuming {run_dir} from step {start}")
        if digest is not None and loader_state.get("data_digest") is None:
            # (fault testing: a run started by an earlier jaxsae resumed on replaced data
            # without a word, the README saying resumes refuse it)
            log(f"note: the checkpoint in {run_dir} was written by a jaxsae that kept no "
                f"fingerprint of its data (before 2026-12-06): that {cfg.data.path} holds the "
                "tokens it trained on cannot be checked (keep the data unchanged until the "
                "run ends)")
        shape = [built.mesh.shape["data"], built.mesh.shape["model"]]
        if loader_state.get("mesh", shape) != shape:  # (only a -1 axis can change: the rest
            # is refused above; fault testing found mesh.model -1 resumed on other devices
            # without a word)
            was = "x".join(map(str, loader_state["mesh"]))
            log(f"note: {run_dir} trained on a {was} mesh (data x model) and resumes on "
                f"{shape[0]}x{shape[1]} (the axis at -1 takes every device): from here it "
                "agrees with an uninterrupted run to float rounding, not bit for bit")
        if start == cfg.optim.total_steps:
            ckpt.tidy(start)
        before = restored.config.optim
        if before.total_steps != cfg.optim.total_steps and cfg.optim.decay_fraction > 0:
            log(f"optim.total_tokens: {cfg.optim.total_tokens:,}, where the checkpoint's run "
                f"had {before.total_tokens:,}: the learning rate's decay follows the new "
                f"length from step {start} on (over the last {cfg.optim.decay_steps} of "
                f"{cfg.optim.total_steps} steps: a run that had begun to decay jumps back "
                "up to the rate of the new schedule)")
        # `auto` warm-ups follow the new length too: one the resumed step is still inside is
        # said (fault testing: a finished L1 ramp restarted, its coefficient 34 % lower, unsaid)
        ramps = [(f"{name}.warmup_steps", a.warmup_steps, t.warmup_steps)
                 for name, t, a in zip(cfg.term_keys(), cfg.resolved_loss,
                                       restored.config.resolved_loss, strict=False)]
        ramps.insert(0, ("optim.warmup_steps", before.warmup, cfg.optim.warmup))
        moved = [(key, a, b) for key, a, b in ramps if a != b and start < b]
        if moved:
            log("warm-ups: " + ", ".join(f"{key} now {b} steps (was {a})" for key, a, b in moved)
                + f", for the new length: from step {start} they ramp on to the end of the "
                "new warm-up (from below where they were)")
        for key in ("path", "target"):  # (fault testing: a moved target went unsaid)
            trained_on, now = getattr(restored.config.data, key), getattr(cfg.data, key)
            if trained_on and now and Path(trained_on).resolve() != Path(now).resolve():
                log(f"data.{key}: {now}, where the checkpoint trained on {trained_on} "
                    "(allowed: the same data moved; other data of the same shape would mix "
                    "two data sets, and the export names only this one)")
    else:
        _check_fresh_start(ckpt, run_dir, dirs, log)
        loader_state, start = None, 0
        stats = estimate_stats(source, n_train, cfg.data,
                               skip_nonfinite=cfg.optim.skip_nonfinite)
        check_held_out_kept(source, n_train, stats)
        built = built_for(stats)
        state = built.init(_start_params(cfg, source.d_in, stats, log))
    # (said once the run is known to go ahead: before a resume refusal it was a second line)
    for note in notes:
        log(note)
    if cfg.optim.total_tokens > n_train:  # (the default, 100M tokens, on small data: say so,
        # and with many passes how to make it one; fault testing: a run given only its data
        # set out for 7 hours over 8k tokens, said in a line easy to miss)
        passes = cfg.optim.total_tokens / n_train
        one = n_train // cfg.optim.batch_size * cfg.optim.batch_size
        log(f"data: optim.total_tokens ({cfg.optim.total_tokens:,}) passes over the "
            f"{n_train:,} training tokens {_times(passes)} times"
            + (f" (one pass: optim.total_tokens={one})" if passes >= 10 else ""))
    if stats.drop_above is not None or stats.scale != 1.0 or stats.target_scale != 1.0:
        log(f"data: median token norm {stats.median_norm:.4g}"
            + (f", dropping tokens with norm > {stats.drop_above:.4g}" if stats.drop_above else "")
            + (f", input scale {stats.scale:.4g}" if stats.scale != 1.0 else "")
            + (f", target scale {stats.target_scale:.4g}" if stats.target_scale != 1.0
               else ""))

    def write_configs():
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        for member, directory in zip(members, dirs, strict=True):
            if cfg.sweep is not None:  # each SAE's directory reads like a run of its own
                directory.mkdir(parents=True, exist_ok=True)
                atomic_write(directory / "config.yaml", member.to_yaml())
            # metrics.jsonl reads like one run: lines logged after the checkpoint (or, for a
            # fresh start, by an attempt killed before its first checkpoint) are dropped.
            said = truncate_metrics(directory / "metrics.jsonl", start)
            if said:
                log(said)

    processes.on_process_0(write_configs)

    # -- loop -------------------------------------------------------------------------------
    total = cfg.optim.total_steps
    batch_size = cfg.optim.batch_size
    try:
        loader = make_loader(source, batch_size=batch_size, buffer_tokens=cfg.data.shuffle_buffer,
                        seed=cfg.data.seed, stop=n_train, lanes=cfg.data.lanes,
                        owned_lanes=owned, keep=stats.keep_fn(source.d_in),
                        position=loader_state)
    except ValueError as e:
        where = "data.generate.tokens" if cfg.data.stream else cfg.data.path
        raise DataError(f"{where}: {e} (fewer data.lanes would fit)") from None
    global_shape = (batch_size, source.width)  # a transcoder's: inputs and targets

    def to_devices(item):  # each process hands over only its rows of the global batch
        rows, position = item
        return jax.make_array_from_process_local_data(
            built.batch_sharding, rows, global_shape), position

    batches = Prefetcher(loader.batches(), depth=2, transform=to_devices)
    position = loader.state()  # of the batches consumed so far

    bar = Progress(total, initial=start, unit="step", desc=cfg.name,
                   enabled=progress and is_main)
    if is_main:  # metrics.jsonl first: the curves are drawn from it
        told.append(MetricsFiles([d / "metrics.jsonl" for d in dirs]))
        if cfg.log.curves:
            told.append(CurvesHook(run_dir, cfg.name, total, log))
        told.extend(trackers(cfg, members, dirs, log, start))
    told.extend([ProgressDisplay(bar), *hooks])

    def save(step: int, state: TrainState):
        saved = {**_gather_positions(position), "data_stats": stats.to_dict(),
                 "mesh": [built.mesh.shape["data"], built.mesh.shape["model"]],
                 **({"data_digest": digest} if digest is not None else {})}
        ckpt.save(step, state, saved, cfg)
        for hook in told:
            hook.on_checkpoint(step)

    stop_signal = SignalFlag()
    logger = MetricLogger(cfg, start, told, dropped=lambda at: dropped_tokens(
        _gather_positions(at)), scale=stats.target_scale if cfg.sae.transcoder else stats.scale)
    pending = None  # (step, device metrics) of the previous step: read one step late
    try:
        for step in range(start, total):
            batch, position = next(batches)
            state, metrics = built.step(state, batch)
            if pending is not None:
                logger.record(*pending)
            pending = (step, metrics, position)
            done = step + 1
            if stop_signal.stop_after(done):
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
        if start == total:  # resumed at its end: the last checkpoint is an earlier call's,
            # and the hooks hear of it as of one just saved (fault testing: a run killed while
            # drawing curves.png, resumed, never drew it)
            for hook in told:
                hook.on_checkpoint(total)
        else:
            save(total, state)
            ckpt.wait()
            if stop_signal.came_during_last_save(total):
                raise Interrupted(
                    f"interrupted by {stop_signal.name} after the last step ({total}); "
                    f"checkpoint saved in {ckpt.directory}. Run the same command again to "
                    "evaluate and export.", 128 + stop_signal.signum)
    finally:
        stop_signal.restore()
        batches.close()
        loader.close()
        bar.close()
    return state, built, stats, dropped_tokens(_gather_positions(position))


def _check_fresh_start(ckpt: Checkpointer, run_dir: Path, dirs: Sequence[Path],
                       log: Callable[[str], None]) -> None:
    """A run with no checkpoint to resume from starts at step 0, unless it had checkpoints
    and none of them restores (set aside as <step>.corrupt, now or by an earlier call) or it
    finished before (eval.json, sae/): starting over would silently throw away what it
    trained, so it is refused. A run that logged steps but saved no checkpoint says that it
    starts over."""
    corrupt = sorted(p.name for p in ckpt.directory.glob("*.corrupt*")
                     if p.name.split(".")[0].isdigit())
    if corrupt:
        raise CheckpointError(
            f"{ckpt.directory}: no checkpoint restores ({', '.join(corrupt)} set aside), so "
            "training would start over from step 0; to start over, move the run directory "
            "(or those checkpoints) away")
    stale = _stale_members(run_dir, dirs)
    finished = _finished_outputs([*dirs, *stale])
    if finished:
        raise CheckpointError(
            f"{ckpt.directory}: no checkpoint to resume from, but the run has finished before "
            f"({finished[0].relative_to(run_dir)}), so training would start over from step 0 "
            "and replace it; to start over, move the run directory away")
    if any(_logged(directory / "metrics.jsonl") for directory in dirs):
        log(f"{run_dir}: no complete checkpoint to resume from; starting over from step 0 "
            "(the steps metrics.jsonl logged are dropped)")
    processes.on_process_0(lambda: _remove_stale_members(run_dir, stale, log))


def _stale_members(run_dir: Path, dirs: Sequence[Path]) -> list[Path]:
    """The entries of run_dir/sweep that are not SAEs of this run (`dirs`): what an earlier
    start of another sweep left there."""
    sweep = run_dir / "sweep"
    if not sweep.is_dir() or sweep.is_symlink():
        return []
    return sorted(p for p in sweep.iterdir() if p not in set(dirs))


_STARTED = {"config.yaml", "metrics.jsonl"}
"""What an SAE's directory holds before the run's first checkpoint."""


def _remove_stale_members(run_dir: Path, stale: list[Path],
                          log: Callable[[str], None]) -> None:
    """A run starting over (no checkpoint) removes the SAE directories an earlier start of a
    larger sweep (or a sweep, now a single run) left, each holding only the config.yaml and
    metrics.jsonl it wrote before its first checkpoint (fault testing: a 64-SAE sweep out of
    memory at its first step, restarted with 2, kept 62 stale SAEs that `plot` drew); anything
    else there is refused, named, and left as it is."""
    if not stale:
        return
    for path in stale:
        names = ({p.name for p in path.iterdir()} if path.is_dir() and not path.is_symlink()
                 else None)
        config = path / "config.yaml"
        if names is None or not names <= _STARTED or (config.exists() and not _readable(config)):
            raise CheckpointError(
                f"{path}: not an SAE of this run, and not what an earlier start of it left "
                "(an SAE directory holding only config.yaml and metrics.jsonl); move it away")
        trained = _logged_past_a_checkpoint(path)
        if trained is not None:  # (a review: an SAE whose checkpoints were moved away)
            raise CheckpointError(
                f"{path}: not an SAE of this run, and its metrics.jsonl logged step {trained}, "
                "past its first checkpoint: a trained SAE's history; move it away")
    for path in stale:
        for name in _STARTED:
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()
        path.rmdir()
    if not any((run_dir / "sweep").iterdir()):
        (run_dir / "sweep").rmdir()
    log(f"{run_dir / 'sweep'}: removed {len(stale)} SAE director"
        f"{'y' if len(stale) == 1 else 'ies'} an earlier start left, not of this run "
        f"({', '.join(p.name for p in stale[:4])}{', ...' if len(stale) > 4 else ''})")


def _logged_past_a_checkpoint(member: Path) -> int | None:
    """The last step `member`'s metrics.jsonl logged if that is at or past the first
    checkpoint its config.yaml asked for (every step past 0 when it saves by time only), else
    None: what a start stopped before its first checkpoint leaves logged nothing there."""
    try:
        with open(member / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    last = None
    for line in reversed(lines):
        with contextlib.suppress(ValueError, KeyError, TypeError):  # (a line of
            # some other making: skipped)
            last = int(json.loads(line)["step"])
            break
    if last is None:
        return None
    every = (load_config(member / "config.yaml").checkpoint.every_steps
             if (member / "config.yaml").exists() else None)
    return last if last >= (every or 1) else None


def _readable(config: Path) -> bool:
    try:
        load_config(config)
    except Exception:
        return False
    return True


def _finished_outputs(dirs: Sequence[Path]) -> list[Path]:
    """What a finished run wrote for its SAEs (eval.json, sae/), of those that exist."""
    return [p for d in dirs for p in (d / "eval.json", d / "sae") if p.exists()]


def _logged(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _check_start_dir(cfg: Config, run_dir: Path) -> None:
    """Refuses the run directory `run_dir` (`cfg`'s, canonical) for a start, the SAE
    directories training will replace in it included (each SAE's sae/); writes nothing."""
    dirs = member_dirs(cfg, run_dir)
    _check_run_dir(run_dir, cfg.data.path)
    _check_data_outside_outputs(run_dir, dirs, {"data.path": cfg.data.path,
                                                "data.target": cfg.data.target})
    _check_run_files(run_dir, dirs)
    _check_sae_dirs(run_dir, dirs)
    _check_finished_without_checkpoints(run_dir, dirs)


def _make_run_dir(run_dir: Path) -> _Made | None:
    """Makes the run directory (checked first: `_check_start_dir`); the topmost directory
    made here (the run directory, or one above it that did not exist either), None if it
    existed."""
    missing = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    if not missing:
        return None
    top = missing[-1]
    before = os.stat(top.parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _Made(top, DirectoryTimes.since(top.parent, before))


@dataclass(frozen=True)
class _Made:
    """The topmost directory a start made, and the times of the directory it was made in (a
    start that removes it again restores them; fault testing: a refused start moved `runs/` in
    `ls -t`)."""
    top: Path
    times: DirectoryTimes | None


def _check_run_dir(run_dir: Path, data: str | None = None) -> None:
    """Refuses a run directory that is a file, the data (`data`: data.path) or inside it, or
    a directory jaxsae did not make (a run, a sweep, an import): training adds files there and
    must not mix them with someone else's."""
    where = f"run_dir {run_dir}"
    if data and outputs.inside(run_dir.resolve(), Path(data).resolve()):
        raise ConfigError(f"{where}: is data.path ({data}) or lies inside it; give the run "
                          "and its data directories of their own")
    if run_dir.is_file() or (run_dir.exists() and not run_dir.is_dir()):
        raise ConfigError(f"{where}: is a file; give a directory (or set name:)")
    if run_dir.is_symlink() and not run_dir.exists():  # (fault testing: "File exists")
        raise ConfigError(f"{where}: is a symbolic link to {os.readlink(run_dir)}, which does "
                          "not exist; make that directory, or give another run_dir")
    if not run_dir.is_dir() or outputs.holds_only_a_lock(run_dir):
        return  # (a start killed before it wrote anything: its lock says if it still runs)
    if not (outputs.output_kind(run_dir) == "import"
            or _is_run_config(run_dir / "config.yaml")):
        if (run_dir / "checkpoints").is_dir():  # (fault testing: called "not a jaxsae run
            # directory", the checkpoints in it said nothing of)
            raise ConfigError(f"{where}: holds checkpoints, but its config.yaml is missing or "
                              "not a jaxsae config (damaged?): put the run's config back there "
                              f"to resume it, or train elsewhere (jaxsae export {run_dir} "
                              "still exports its checkpoints)")
        raise ConfigError(f"{where}: exists and is not a jaxsae run directory (no jaxsae "
                          "config.yaml); choose another name or run_dir")
    foreign = foreign_steps(run_dir / "checkpoints")
    if foreign:
        raise ConfigError(f"{where}: checkpoints/ holds {', '.join(foreign[:3])}, which no "
                          "jaxsae save wrote (training would set it aside); move it away")


def _check_data_outside_outputs(run_dir: Path, dirs: Sequence[Path],
                                data: Mapping[str, str | None]) -> None:
    """Refuses data in a directory of the run that training sets aside or replaces
    (checkpoints/, each SAE's sae/, a sweep's SAE directories): it would be read while it is
    written over, or deleted."""
    written = [run_dir / "checkpoints", *(d / "sae" for d in dirs),
               *([run_dir / "sweep"] if dirs != [run_dir] else [])]
    for key, path in data.items():
        if not path:
            continue
        resolved = Path(path).resolve()
        for place in written:
            if outputs.inside(resolved, place.resolve()):
                raise ConfigError(f"{key} {path}: lies in {place}, which training writes; "
                                  "keep the data out of the run's checkpoints/, sae/ and "
                                  "sweep/")


def _check_finished_without_checkpoints(run_dir: Path, dirs: Sequence[Path]) -> None:
    """Refuses, before the run directory is locked or added to, a finished run with no
    checkpoints/ to resume from — a sweep's SAE directory (its checkpoints are the sweep's),
    or a run whose checkpoints were moved away: training would start over and replace it.
    (A checkpoints/ with none that restores is `_check_fresh_start`'s.)"""
    if (run_dir / "checkpoints").exists():
        return
    finished = _finished_outputs(dirs)
    if not finished:
        return
    sweep = run_dir.parent.parent
    if run_dir.parent.name == "sweep" and _is_run_config(sweep / "config.yaml"):
        raise ConfigError(f"run_dir {run_dir}: is an SAE of the sweep in {sweep}, whose "
                          f"checkpoints it shares; resume the sweep (jaxsae train "
                          f"{sweep / 'config.yaml'}) or give a run_dir of its own")
    raise ConfigError(f"run_dir {run_dir}: finished before ({finished[0].relative_to(run_dir)}) "
                      "and has no checkpoints/ to resume from, so training would start over "
                      "and replace it; give another run_dir, or move this one away")


def _is_run_config(path: Path) -> bool:
    """Whether `path` is a jaxsae run config (jaxsae writes one in every run directory, and a
    user may write their own there): a valid config, not merely a file of that name."""
    try:
        load_config(path)
    except (JaxsaeError, OSError):
        return False
    return True


def _check_run_files(run_dir: Path, dirs: Sequence[Path]) -> None:
    """Refuses, before any training, a run directory where something else stands in for its
    checkpoints/ or for a file training writes (fault testing: a file named checkpoints made
    training start over, dropping the steps metrics.jsonl had logged, and fail at its first
    save; a directory named eval.json failed the run after its export)."""
    checkpoints = run_dir / "checkpoints"
    if (checkpoints.is_symlink() and not checkpoints.exists()) or (
            checkpoints.exists() and not checkpoints.is_dir()):
        raise ConfigError(f"run_dir {run_dir}: checkpoints is not a directory; training keeps "
                          "its checkpoints there: move it away")
    for directory in dict.fromkeys((run_dir, *dirs)):
        for name in outputs.RUN_FILES:
            path = directory / name
            if path.exists() and not path.is_file():
                raise ConfigError(f"run_dir {run_dir}: {path.relative_to(run_dir)} is not a "
                                  "file; training writes it: move it away")


def _check_sae_dirs(run_dir: Path, dirs: Sequence[Path]) -> None:
    """Refuses, before any training, a run whose sae/ (where training writes its SAE when it
    ends, replacing an earlier one) is not jaxsae's or holds files jaxsae did not write."""
    for directory in dirs:
        target = directory / "sae"
        where = f"run_dir {run_dir}: {target.relative_to(run_dir)}/"
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise ConfigError(f"{where} is not a directory; training writes its SAE there: "
                              "move it away")
        if not target.exists() or not any(target.iterdir()):
            continue
        if outputs.output_kind(target) != "sae":
            raise ConfigError(f"{where} is not an SAE jaxsae wrote; training writes its SAE "
                              "there when it ends: move it away")
        foreign = outputs.foreign_entries(target)
        added = outputs.added_files_message(where, foreign)
        if added is not None:
            raise ConfigError(f"{added}; training replaces sae/ when it ends: move "
                              + ("it away (after keeping what is yours)" if foreign is None
                                 else "them away"))


def _lock_run_dir(run_dir: Path, is_main: bool, log: Callable[[str], None],
                  make: Callable[[], _Made | None]) -> tuple[RunLock, _Made | None]:
    """The run directory's lock, taken by process 0 for all processes of a run, and the
    topmost directory `make` (which checks and makes the run directory) made again if the
    directory was gone: a start refused at the same time (bad data, say) removes what it made
    (fault testing: a good start then failed, "cannot find RUN/.lock")."""
    lock, remade = RunLock(run_dir, log), None
    refused: Exception | None = None
    if is_main:
        for attempt in range(5):  # (errors raised after the other processes hear of them)
            try:
                lock.acquire()
                break
            except RunLocked as e:
                refused = e
                break
            except FileNotFoundError as e:
                if attempt == 4:
                    refused = e
                    break
                try:
                    remade = make() or remade
                except JaxsaeError as again:
                    refused = again
                    break
    if jax.process_count() > 1:
        held = bool(multihost_utils.broadcast_one_to_all(np.asarray(refused is None)))
        if not held and refused is None:
            refused = RunLocked(f"{run_dir}: another jaxsae process is training here (see "
                                "process 0)")
    if refused is not None:
        raise refused
    return lock, remade


def _start_params(cfg: Config, d_in: int, stats: DataStats,
                  log: Callable[[str], None]) -> sae.Params | None:
    """The parameters of init_from (None: a random init from the seed)."""
    if cfg.init_from is None:
        return None
    export.check_init_from(cfg.init_from, cfg.sae)
    params = export.initial_params(cfg.init_from, cfg.sae, d_in, stats.scale, log=log)
    log(f"starting from {cfg.init_from}")
    return params


def _close_quietly(ckpt: Checkpointer) -> None:
    with contextlib.suppress(Exception):
        ckpt.close()


def _gather_positions(position: dict) -> dict:
    """The loader position with every process's lanes filled in (process 0 writes it)."""
    if jax.process_count() == 1:
        return position
    lanes = np.asarray([p if p is not None else [-1, -1, -1] for p in position["lanes"]])
    merged = multihost_utils.process_allgather(lanes).max(axis=0)
    gathered = {**position, "lanes": merged.tolist()}
    if "dropped" in position:  # (every process holds it, or none: the same checkpoint)
        counts = np.asarray([-1 if c is None else c for c in position["dropped"]], np.int64)
        gathered["dropped"] = multihost_utils.process_allgather(counts).max(axis=0).tolist()
    return gathered


def _check_stream_unchanged(saved: Config, cfg: Config, where: Path) -> None:
    """Streamed data is its generator: data.generate (mutable on resume for written data, which
    is only generated when missing) must not change, nor whether the data is streamed."""
    if not (saved.data.stream or cfg.data.stream):
        return
    if saved.data.stream != cfg.data.stream:
        raise JaxsaeError(f"{where}: cannot resume with a changed data.stream (the checkpoint "
                          f"was trained with data.stream {str(saved.data.stream).lower()})")
    # compared as the generator resolves them (fault testing: a default written out, or the
    # token count the run itself printed, was refused as a change, naming no key); `tokens`
    # left out by both is the run's size, as long as the run is
    specs = [_generator_settings(c) for c in (saved, cfg)]
    if not any("tokens" in c.data.generate for c in (saved, cfg)):
        for spec in specs:
            spec.pop("tokens")
    differ = [k for k in dict.fromkeys([*specs[0], *specs[1]])  # (`kind` first)
              if specs[0].get(k) != specs[1].get(k)]
    if differ:
        key = differ[0]
        raise JaxsaeError(f"{where}: cannot resume with a changed data.generate.{key} "
                          f"({specs[0].get(key)!r} in the checkpoint, {specs[1].get(key)!r} "
                          "now; the streamed data is drawn from it): restore it, or start a "
                          "new run")


def _generator_settings(cfg: Config) -> dict[str, Any]:
    """data.generate as its generator resolves it (presets, defaults; a streamed run's tokens
    sized for it): two spellings of the same data compare equal."""
    from jaxsae.data.generated import stream_spec

    raw = dict(cfg.data.generate)
    spec = (stream_spec(raw, cfg.optim.total_tokens, cfg.data.held_out) if cfg.data.stream
            else synthetic.parse_spec(raw, key="data.generate")[1])
    return {"kind": raw.get("kind"), **synthetic.spec_dict(spec)}


def _check_same_data(state: dict, digest: str | None, cfg: Config, where: Path) -> None:
    """The data holds the values the checkpoint trained on (fault testing: a shard replaced
    by one of the same size resumed without a word, training on a mix of two data sets under
    the first one's statistics). Checkpoints from before the digest was kept restore."""
    saved = state.get("data_digest")
    if saved is None or digest is None or saved == digest:
        return
    what = f"{cfg.data.path}" + (f" / {cfg.data.target}" if cfg.data.target else "")
    raise DataError(f"{what}: holds other values than the data the checkpoint in {where} "
                    "trained on (as many tokens, but a file was replaced or edited); resuming "
                    "would train on a mix of two data sets: restore the data, or start a new "
                    "run in another run_dir")


def _check_loader_state(state: dict, cfg: Config, source, n_train: int, where: Path) -> None:
    refuse_other_sampler(state.get("sampler"), source, where,
                         "start a new run, or resume with the jaxsae that started it")
    if state.get("n_lanes") != cfg.data.lanes:
        raise JaxsaeError(f"{where}: the checkpoint used data.lanes {state.get('n_lanes')}, "
                          f"the config says {cfg.data.lanes}")
    if state.get("d_out", 0) != source.d_out:
        raise DataError(f"{cfg.data.target or cfg.data.path}: the targets are {source.d_out} "
                        f"wide, but the checkpoint in {where} was trained on "
                        f"{state.get('d_out', 0)}")
    if state.get("d_in") != source.d_in:
        raise DataError(f"{cfg.data.path}: d_in is {source.d_in} but the checkpoint in {where} "
                        f"was trained on d_in {state.get('d_in')}")
    if state.get("n_tokens") != n_train or state.get("batch_size") != cfg.optim.batch_size:
        if cfg.data.stream and state.get("batch_size") == cfg.optim.batch_size:
            raise JaxsaeError(
                f"{where}: the streamed data was sized for the checkpoint's run "
                f"({state.get('n_tokens')} training tokens) and optim.total_tokens changed it "
                f"to {n_train}; to train longer, set data.generate.tokens (the data's size) "
                "when the run starts")
        raise JaxsaeError(
            f"{where}: the data changed since the checkpoint (it was {state.get('n_tokens')} "
            f"training tokens in batches of {state.get('batch_size')}, now {n_train} in "
            f"{cfg.optim.batch_size}); resuming would not see the same batches"
        )
