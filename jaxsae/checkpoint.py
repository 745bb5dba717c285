"""Orbax checkpoints of a run: the train state, the loader position and the resolved config.

Resume order (one place, one comment): read the config saved with the newest complete
checkpoint -> refuse changed keys that alter what is computed -> restore the state into the
abstract state with its shardings -> put the loader at the saved position -> continue with the
next step. Orbax writes each checkpoint into a temporary directory and renames it when complete,
so a checkpoint interrupted mid-write is never picked up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxsae.config import (
    CheckpointConfig,
    Config,
    changed_keys,
    config_from_dict,
    is_mutable_on_resume,
)
from jaxsae.errors import JaxsaeError

# Orbax writes this into a checkpoint once every item is saved (before the atomic rename),
# and saves into <step><TMP_SUFFIX> until then.
COMMIT_MARKER = "commit_success.txt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self._last_save = time.monotonic()
        self.set_aside = self._set_aside_incomplete()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxsae-checkpoint-scan")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                create=True,
                enable_async_checkpointing=True,
                # Leftovers of interrupted saves are set aside synchronously above instead:
                # orbax's asynchronous cleanup raced with a second manager on the directory.
                cleanup_tmp_directories=False,
            ),
            item_names=("state", "loader", "config"),
        )

    def _set_aside_incomplete(self) -> list[Path]:
        """Renames what interrupted saves left behind (orbax's <step><TMP_SUFFIX> directories,
        and step directories without the commit marker: a copy cut short, a filesystem without
        atomic rename) to <step>.incomplete, so they are neither resumed from nor in the way of
        a later save of that step. Nothing is deleted."""
        moved: list[Path] = []
        if jax.process_index() != 0 or not self.directory.is_dir():
            return moved
        for path in sorted(self.directory.iterdir()):
            step = path.name.removesuffix(TMP_SUFFIX)
            if not (path.is_dir() and step.isdigit()):
                continue
            if path.name.endswith(TMP_SUFFIX) or not (path / COMMIT_MARKER).exists():
                target, n = path.with_name(f"{step}.incomplete"), 1
                while target.exists():
                    target, n = path.with_name(f"{step}.incomplete-{n}"), n + 1
                moved.append(path.rename(target))
        return moved

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
        """Starts an asynchronous save (the device arrays are copied before this returns)."""
        self._last_save = time.monotonic()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loader=ocp.args.JsonSave(loader_state),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=True,
        )

    def restore_meta(self, step: int) -> tuple[dict, Config]:
        """The loader position and the config saved with step `step` (cheap: no arrays)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(loader=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()),
        )
        return dict(restored.loader), config_from_dict(restored.config)

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The train state of step `step`, placed on the shardings carried by `abstract_state`."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_resume_compatible(saved: Config, current: Config, where: Path) -> None:
    """Refuses to resume when a key that changes the computation differs, naming the key."""
    bad = [k for k in changed_keys(saved, current) if not is_mutable_on_resume(k)]
    if bad:
        raise JaxsaeError(
            f"{where}: cannot resume with a changed {', '.join(bad)} (the checkpoint was trained "
            "with different values); restore them, or start a new run with another name/run_dir"
        )


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
