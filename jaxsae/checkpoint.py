"""Orbax checkpoints of a run: the train state, the loader position, the resolved config, and
a checksum of the state with digests of the other two.

Resume order (one place, one comment): take the newest checkpoint that restores whole (config
and loader position parse and match their digests, the state restores, its checksum matches)
-> refuse changed keys that alter what is computed -> restore the state into the abstract state
with its shardings -> put the loader at the saved position -> continue with the next step. A
checkpoint that does not restore is renamed `<step>.corrupt` (never deleted) and the one before
it is tried.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
checkpoint interrupted mid-write is never picked up; what such a save leaves behind is renamed
`<step>.incomplete` when the directory is opened and removed after the next successful save
(or, for a run resumed at its last step, which saves nothing more, by `Checkpointer.tidy`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxsae.config import (
    CheckpointConfig,
    Config,
    auto_since,
    changes_of,
    config_from_dict,
    is_mutable_on_resume,
    sweep_label,
)
from jaxsae.errors import JaxsaeError
from jaxsae.parsing import shown

# Orbax writes this into a checkpoint once every item is saved (before the atomic rename),
# and saves into <step><TMP_SUFFIX> until then.
COMMIT_MARKER = "commit_success.txt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
ITEMS = ("state", "loader", "config", "checksum")


class CheckpointError(JaxsaeError):
    """A checkpoint could not be written, or none could be restored."""


class CorruptCheckpoint(Exception):
    """One checkpoint does not restore (caught by the fallback; `reason` is one line)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step}: {reason}")
        self.step, self.reason = step, reason


@dataclass(frozen=True)
class Restored:
    step: int
    loader: dict
    config: Config
    state: Any


@jax.jit
def state_checksum(state: Any) -> jax.Array:
    """[n_leaves] uint32: per leaf, Σ_i bits_i · (2·i + 1) mod 2³² over its elements' bit
    patterns (i: the flat index). Any single changed element changes it (the weights are odd),
    the sum is exact in any order, so every sharding gives the same value, and it costs one
    fused pass on the device (the weights are iotas, never materialised)."""

    def leaf(a: jax.Array) -> jax.Array:
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        if a.dtype == jnp.bool_:
            a = a.astype(jnp.uint8)
        if a.dtype.itemsize >= 4:  # 8-byte values become pairs of words (a trailing axis)
            bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
        else:
            width = {1: jnp.uint8, 2: jnp.uint16}[a.dtype.itemsize]
            bits = jax.lax.bitcast_convert_type(a, width).astype(jnp.uint32)
        index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
        for axis in reversed(range(bits.ndim)):
            iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
            index, stride = index + iota * jnp.uint32(stride % 2**32), stride * bits.shape[axis]
        return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)

    leaves = [leaf(a) for a in jax.tree.leaves(state)]
    return jnp.stack(leaves) if leaves else jnp.zeros((0,), jnp.uint32)


def json_digest(value: Any) -> str:
    """sha256 of a JSON value as JSON reads it back (key order aside)."""
    text = json.dumps(json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Checkpointer:
    """The checkpoints of one run directory. `read_only`: for reading a run another process
    may be training (export): nothing in the directory is renamed or removed."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self.read_only = read_only
        self._last_save = time.monotonic()
        self._saving: int | None = None  # the step of a save that may still be running
        self._closed = False
        _quiet_orbax_background_errors()
        _skip_orbax_io_metrics()
        self.set_aside = [] if read_only else self._set_aside_incomplete()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxsae-checkpoint-scan")
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.cfg.keep,
                create=not self.read_only,
                enable_async_checkpointing=True,
                # Leftovers of interrupted saves are set aside synchronously above instead:
                # orbax's asynchronous cleanup raced with a second manager on the directory.
                cleanup_tmp_directories=False,
            ),
            item_names=ITEMS,
        )

    def _set_aside_incomplete(self) -> list[Path]:
        """Renames what interrupted saves left behind (orbax's <step><TMP_SUFFIX> directories,
        and step directories without the commit marker: a copy cut short, a filesystem without
        atomic rename) to <step>.incomplete, so they are neither resumed from nor in the way of
        a later save of that step."""
        moved: list[Path] = []
        if jax.process_index() != 0 or not self.directory.is_dir():
            return moved
        for path in sorted(self.directory.iterdir()):
            step = path.name.removesuffix(TMP_SUFFIX)
            if not (path.is_dir() and step.isdigit()):
                continue
            if path.name.endswith(TMP_SUFFIX) or not (path / COMMIT_MARKER).exists():
                moved.append(path.rename(_free_name(self.directory, f"{step}.incomplete")))
        return moved

    def _remove_incomplete(self) -> None:
        """After a successful save: the leftovers of failed saves are of no more use."""
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in self.directory.glob("*.incomplete*"):
            if path.is_dir() and path.name.split(".")[0].isdigit():
                shutil.rmtree(path, ignore_errors=True)

    def tidy(self, restored: int) -> None:
        """For a run resumed at its end (`restored` is its last step: nothing more is saved,
        so neither orbax's retention nor `_remove_incomplete` runs again): what a killed run
        left is removed now: the `.incomplete` leftovers (a retention's deletion cut short),
        and the complete checkpoints before `restored` beyond `checkpoint.keep` (killed
        between a save and the retention after it); fault testing found both kept for good."""
        if self.read_only:
            return
        self._remove_incomplete()  # (no later save can be the one they were)
        if jax.process_index() == 0:
            for step in self.steps()[:-self.cfg.keep]:
                if step < restored:
                    shutil.rmtree(self.directory / str(step), ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxsae-checkpoint-tidy")
        self.manager.reload()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The complete checkpoints (orbax's commit marker written), oldest first."""
        return sorted(s for s in self.manager.all_steps()
                      if (self.directory / str(s) / COMMIT_MARKER).exists())

    def due(self, step: int) -> bool:
        """Whether to save after `step` (every_steps and/or every_minutes since the last save;
        with several processes, process 0's clock decides for all, as saving is collective)."""
        by_steps = self.cfg.every_steps is not None and step % self.cfg.every_steps == 0
        if by_steps or self.cfg.every_minutes is None:
            return by_steps
        late = time.monotonic() - self._last_save >= 60 * self.cfg.every_minutes
        if jax.process_count() > 1:
            late = bool(multihost_utils.broadcast_one_to_all(np.asarray(late)))
        return late

    def save(self, step: int, state: Any, loader_state: dict, config: Config) -> None:
        """Starts an asynchronous save (the device arrays are copied before this returns). An
        earlier save that failed (disk full, ...) raises CheckpointError here."""
        self.wait()  # orbax would wait for the previous save anyway; this reports its failure
        self._last_save = time.monotonic()
        checksum = np.asarray(jax.device_get(state_checksum(state))).tolist()
        config_tree = config.to_dict()
        with self._writing(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    loader=ocp.args.JsonSave(loader_state),
                    config=ocp.args.JsonSave(config_tree),
                    checksum=ocp.args.JsonSave({"state": checksum,
                                                "loader": json_digest(loader_state),
                                                "config": json_digest(config_tree)}),
                ),
                force=True,
            )
        self._saving = step

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Orbax's errors while writing (raised by the save, or by the wait for an
        asynchronous one) as one line naming the checkpoint and the reason."""
        try:
            yield
        except Exception as e:
            which = f"checkpoint {step}" if step is not None else "a checkpoint"
            raise CheckpointError(f"{self.directory}: could not write {which}: "
                                  f"{_os_reason(e)}") from None

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Checkpoint `step`, whole and checked; CorruptCheckpoint if any part fails."""
        loader, config = self.restore_meta(step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            state = restored.state
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CorruptCheckpoint(step, f"the state does not restore ({_os_reason(e)})") \
                from None
        record = self._checksum(step)
        if record is not None:
            got = np.asarray(jax.device_get(state_checksum(state))).tolist()
            if got != list(record["state"]):
                raise CorruptCheckpoint(step, "the state's checksum does not match (damaged "
                                              "files)")
        return Restored(step=step, loader=loader, config=config, state=state)

    def restore_meta(self, step: int) -> tuple[dict, Config]:
        """The loader position and the config saved with step `step` (cheap: no arrays)."""
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(loader=ocp.args.JsonRestore(),
                                              config=ocp.args.JsonRestore()))
            loader, raw = restored.loader, restored.config
            if not isinstance(loader, dict) or not isinstance(raw, dict):
                raise ValueError("not JSON objects")
        except Exception as e:
            raise CorruptCheckpoint(step, f"its loader position or config does not read "
                                          f"({_os_reason(e)})") from None
        # (fault testing: an edited loader position resumed without a word, and the run was
        # no longer the one an uninterrupted run would have been)
        record = self._checksum(step) or {}
        for name, value in (("loader position", loader), ("config", raw)):
            expected = record.get(name.split()[0])
            if expected is not None and expected != json_digest(value):
                raise CorruptCheckpoint(step, f"its {name} does not match its checksum "
                                              "(damaged files)")
        try:
            return dict(loader), config_from_dict(_as_started(raw))
        except JaxsaeError as e:
            raise CorruptCheckpoint(step, f"its saved config is not valid ({e})") from None

    def _checksum(self, step: int) -> dict[str, Any] | None:
        """The checksum record saved with `step`: the state's checksum ("state") and the
        digests of its loader position and config ("loader", "config"; not in checkpoints
        written before 2026-12-06). None for checkpoints written before jaxsae saved one:
        their orbax metadata names no checksum item. A checksum missing from a checkpoint
        saved with one is damage (fault testing: deleting it let a damaged state restore
        unchecked)."""
        if not (self.directory / str(step) / "checksum").is_dir():
            items = _saved_items(self.directory / str(step))
            if items is not None and "checksum" not in items:
                return None
            raise CorruptCheckpoint(step, "its checksum is missing")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(checksum=ocp.args.JsonRestore()))
            record = restored.checksum
            if not (isinstance(record, dict) and isinstance(record.get("state"), list)):
                raise ValueError("not a checksum record")
            return record
        except Exception as e:
            raise CorruptCheckpoint(step, f"its checksum does not read ({_os_reason(e)})") \
                from None

    def set_aside_corrupt(self, step: int) -> Path:
        """Renames checkpoint `step` to `<step>.corrupt` (kept for inspection, never deleted)
        and forgets it."""
        target = _free_name(self.directory, f"{step}.corrupt")
        if self.read_only:
            return self.directory / str(step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxsae-corrupt-{step}")
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxsae-corrupt-{step}-moved")
        self.manager.reload()
        return target

    def restore_newest(self, abstract_for, log) -> Restored | None:
        """The newest checkpoint that restores whole, setting aside (and logging) each one
        that does not. `abstract_for(loader, config)` gives the abstract state to restore into,
        and may raise JaxsaeError to refuse the checkpoint (a changed config): that is not
        corruption and stops the search. Read-only (a run that may be training meanwhile),
        a checkpoint its retention removed while this read it is passed over, not taken for
        a damaged one, and the steps are listed again (a newer one may have been saved)."""
        tried: set[int] = set()
        while True:
            if self.read_only:
                self.manager.reload()
            left = [s for s in self.steps() if s not in tried]
            if not left:
                return None
            step = left[-1]
            tried.add(step)
            problem = None
            try:
                loader, config = self.restore_meta(step)
                restored = self.restore(step, abstract_for(loader, config))
            except CorruptCheckpoint as e:
                problem = e
            except OSError:
                if not self._removed_meanwhile(step):
                    raise
                continue
            if problem is not None and self._removed_meanwhile(step):
                continue
            if jax.process_count() > 1:  # every process must take the same checkpoint
                ok = multihost_utils.process_allgather(np.asarray(problem is None))
                if problem is None and not ok.all():
                    problem = CorruptCheckpoint(step, "it does not restore on another process")
            if problem is None:
                return restored
            moved = self.set_aside_corrupt(step)
            kept = ("left in place (the run is in use)" if self.read_only
                    else f"set aside as {moved.name}")
            log(f"{self.directory}: skipping {problem}; {kept}")

    def _removed_meanwhile(self, step: int) -> bool:
        """Whether read-only reading lost `step` to the training run's retention."""
        return self.read_only and not (self.directory / str(step) / COMMIT_MARKER).exists()

    def wait(self) -> None:
        with self._writing(self._saving):
            self.manager.wait_until_finished()
        if self._saving is not None:
            self._saving = None
            self._remove_incomplete()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self.manager.close()


def foreign_steps(directory: Path) -> list[str]:
    """The entries of a checkpoints/ directory named like a step (a Checkpointer sets one
    aside, and later removes it, when it holds no complete save) that no jaxsae save wrote:
    a file, a link, or a directory holding files but none of a save's items, its commit
    marker or orbax's metadata. (Orbax's temporary names and jaxsae's `.incomplete` /
    `.corrupt` set-asides are jaxsae's by name; an empty directory holds nothing to lose.)"""
    ours = {*ITEMS, COMMIT_MARKER, "_CHECKPOINT_METADATA"}
    foreign = []
    with contextlib.suppress(OSError):
        for entry in sorted(directory.iterdir()):
            if not entry.name.isdigit():
                continue
            if entry.is_symlink() or not entry.is_dir():
                foreign.append(entry.name)
                continue
            names = {p.name for p in entry.iterdir()}
            if names and not names & ours:
                foreign.append(entry.name)
    return foreign


def _free_name(directory: Path, name: str) -> Path:
    target, n = directory / name, 1
    while target.exists():
        target, n = directory / f"{name}-{n}", n + 1
    return target


def _saved_items(directory: Path) -> set[str] | None:
    """The items orbax's metadata says were saved in checkpoint `directory` (None: it does
    not read)."""
    try:
        metadata = json.loads((directory / "_CHECKPOINT_METADATA").read_text())
        return set(metadata["item_handlers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _os_reason(error: BaseException) -> str:
    """The short reason inside an orbax / tensorstore error (e.g. 'No space left on device'),
    else its first line. Tensorstore words the same failed write several ways (which layer
    reports it depends on how orbax batched the writes), but each carries the OS's error
    code, and that is what is reported."""
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    known = [os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS,
                                      errno.EACCES, errno.EPERM, errno.EIO)]
    found = next((reason for reason in known if reason in text), None)
    if found:
        return found
    if "See full TensorStore details" in text:  # (then a repr of the whole spec: fault
        # testing found it in the one line a damaged checkpoint's skip prints)
        arrays = [p for p in re.findall(r"'path': '([^']*)'", text) if not p.startswith("/")]
        what = f"array {arrays[-1].rstrip('/')}" if arrays else "an array"
        return f"tensorstore could not read {what}"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if len(first) <= 160 else first[:157] + "..."


_quieted = False


def _quiet_orbax_background_errors() -> None:
    """Orbax's background threads log a failed save at ERROR (absl), and leave futures and
    coroutines that asyncio and Python report when they are collected; the failure itself is
    raised in the main thread, where it becomes a one-line error. Those duplicates are
    dropped; every other message passes."""
    global _quieted
    if _quieted:
        return
    _quieted = True

    def from_orbax(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR and (
            "orbax" in record.pathname or "tensorstore" in record.pathname)

    logging.getLogger("absl").addFilter(lambda record: not from_orbax(record))

    def orbax_future(record: logging.LogRecord) -> bool:
        # asyncio reports the failed writes' futures "never retrieved" when they are collected
        text = record.getMessage()
        if record.exc_info and record.exc_info[2] is not None:
            text += " ".join(frame.filename for frame in traceback.extract_tb(record.exc_info[2]))
        return any(name in text for name in ("orbax", "tensorstore", "OCDBT"))

    logging.getLogger("asyncio").addFilter(lambda record: not orbax_future(record))
    previous = sys.unraisablehook

    def hook(unraisable):
        origin = getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
        if "orbax" in origin or "tensorstore" in origin or (
                isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _skip_orbax_io_metrics() -> None:
    """Orbax measures the bytes each save writes by collecting tensorstore's metrics, twice a
    save, for a line of its own INFO log (which jaxsae does not show); in tensorstore 0.1.86
    every collection leaks ~3.5 KB of host memory (measured 2026-12-07: a process saving
    1,200 times grew 21.6 KB a save with it, 4.1 KB without; fault testing: a week-long run
    grows by gigabytes). The measurement is turned off: orbax then skips that line."""
    with contextlib.suppress(ImportError):
        from orbax.checkpoint._src.serialization import tensorstore_utils

        if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
            tensorstore_utils.get_tensorstore_raw_bytes = _no_raw_bytes


def _no_raw_bytes(direction: Any = None) -> None:
    """(orbax's `_record_raw_metrics` records nothing when the first reading is None)"""
    return None


def _as_started(raw: dict) -> dict:
    """A saved config as its run started: one saved before `sae.init_l0` existed (2026-12-07)
    started from an encoder bias of 0, which `null` says (its `auto` would read as d_in for
    unit rows)."""
    sae = raw.get("sae")
    if isinstance(sae, dict) and "init_l0" not in sae:
        return {**raw, "sae": {**sae, "init_l0": None}}
    return raw


def check_resume_compatible(saved: Config, current: Config, where: Path) -> None:
    """Refuses to resume when a key that changes the computation differs, naming the key.
    Loss terms' `auto` ramps are compared as the checkpoint's run resolved them: a run
    extended on resume changes them as it changes its learning-rate schedule (and a
    checkpoint of 0.2.0, which kept them resolved, is the same run as its config with
    `auto`)."""
    def computed(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
        return [(k, a, b) for k, a, b in changes_of(before.to_dict(), after.to_dict())
                if not is_mutable_on_resume(k)]

    steps = saved.optim.total_steps
    if saved.sweep is not None and current.sweep is None:
        # (fault testing: a sweep SAE's own sweep/<i>/config.yaml, trained without run_dir=,
        # was refused for the base config's coefficient, "0.3 in the checkpoint", which no
        # SAE of the sweep had trained at)
        members = saved.sweep_configs()
        alone = current.ramped_for(steps)
        same = [i for i, one in enumerate(members) if not computed(one.ramped_for(steps), alone)]
        what = (f"is SAE {same[0]} of it ({sweep_label(saved.sweep.points[same[0]])})"
                if same else "has no sweep")
        raise JaxsaeError(
            f"{where}: holds a sweep of {len(members)} SAEs and this config {what}: "
            "train it alone in another directory (run_dir=...), or resume the sweep with "
            f"{where / 'config.yaml'}")
    bad = computed(saved.ramped_for(steps), current.ramped_for(steps))
    swept = [b for b in bad if b[0] == "sweep" or b[0].startswith("sweep.")]
    if swept and saved.sweep is not None and current.sweep is not None:
        # the same SAEs written otherwise (a term by its name, then by its position: fault
        # testing found it refused, reading None on both sides) are the same sweep
        before, after = ([one.ramped_for(steps) for one in cfg.sweep_configs()]
                         for cfg in (saved, current))
        if len(before) == len(after):  # what differs is said of each SAE, in its own keys
            bad = [b for b in bad if b not in swept] + [
                (f"{k} of sweep SAE {i}", a, b)
                for i, (one, other) in enumerate(zip(before, after, strict=True))
                for k, a, b in computed(one, other) if not any(k == c for c, _, _ in bad)]
    changed = {k for k, _, _ in bad}
    # a key auto derives from another that changed follows it: said, it reads as if it had to
    # be set too (fault testing: a changed batch size listed data.lanes)
    bad = [b for b in bad if current.follows.get(b[0]) not in changed]
    if bad:
        def cut(value: Any) -> str:
            # as YAML spells it (fault testing: None, and lists of Python dicts)
            text = (json.dumps(value, default=str) if isinstance(value, list | dict)
                    else shown(value))
            return text if len(text) <= 60 else text[:57] + "..."

        def pair(saved: Any, now: Any) -> tuple[str, str]:
            """The two values; lists by their lengths when those differ, else by the first
            entry that does (fault testing: both cut to the same 57 characters)."""
            if not (isinstance(saved, list) and isinstance(now, list)):
                return cut(saved), cut(now)
            if len(saved) != len(now):
                return (f"{len(saved)} entr{'y' if len(saved) == 1 else 'ies'}",
                        f"{len(now)} entr{'y' if len(now) == 1 else 'ies'}")
            i = next(i for i, (a, b) in enumerate(zip(saved, now, strict=True)) if a != b)
            return f"[{i}] {cut(saved[i])}", f"[{i}] {cut(now[i])}"

        def now(key: str, value: Any) -> str:  # (a key left to auto, or an entry of one: what
            # gives the checkpoint's value)
            root = next((d for d in current.defaulted
                         if key == d or key.startswith(d + ".")), None)
            if root is None:
                made = current.loss_made_from if key.startswith("loss.") else None
                return f" now: {made}" if made else " now"
            since = auto_since(root, current.sae.activation)
            return (f" now: the default since {since}" if value == "auto"
                    else f" now: what auto gives since {since}")

        def unset(key: str, value: Any) -> Any:  # (a term's ramp of 0 is not written: it
            # read "null now", fault testing)
            return 0 if value is None and key.endswith(".warmup_steps") else value

        changes = ", ".join(f"{k} ({a} in the checkpoint, {b}{now(k, value)})"
                            for k, a, b, value in ((k, *pair(unset(k, a), unset(k, b)), b)
                                                   for k, a, b in bad[:3]))
        if len(bad) > 3:  # (a sweep's points: the line grew with every SAE)
            changes += f" and {len(bad) - 3} more"
        raise JaxsaeError(
            f"{where}: cannot resume with a changed {changes}; restore "
            f"{'them' if len(bad) > 1 else 'it'}, or start a new run with another name/run_dir")


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
