"""Experiment trackers: Weights & Biases (`log.wandb`) and TensorBoard (`log.tensorboard`), as
hooks on the training loop (`jaxsae.hooks.LoopHook`).

`metrics.jsonl` stays the source of truth; a tracker gets the same lines (x-axis: tokens), and
the final evaluation. Each SAE of a sweep is a tracker run of its own (wandb: one run per SAE,
all in one group). A resumed run continues the same wandb run (its id is kept in the SAE's
directory) and appends to the same TensorBoard directory. Only process 0 tracks. A tracker that
fails while training (no network, a bad key, a full disk) warns once and is dropped: weeks of
training do not stop for a dashboard.
"""

from __future__ import annotations

import importlib.util
import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path

from jaxsae.config import Config, sweep_label
from jaxsae.errors import ConfigError
from jaxsae.hooks import GuardedHook, LoopHook
from jaxsae.outputs import atomic_write

WANDB_ID_FILE = "wandb-run-id"
TENSORBOARD_DIR = "tensorboard"
_EXTRAS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboardX", "tensorboard")}


def check_available(cfg: Config) -> None:
    """Refuses, before any work, a tracker whose package is not installed."""
    for key, on in (("wandb", cfg.log.wandb is not None), ("tensorboard", cfg.log.tensorboard)):
        module, extra = _EXTRAS[key]
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.{key}: needs the {module} package: "
                              f"pip install 'jaxsae[{extra}]'")


def trackers(cfg: Config, members: list[Config], dirs: list[Path],
             warn: Callable[[str], None], start: int = 0) -> list[LoopHook]:
    """The trackers `cfg.log` asks for (call on process 0 only); `start`: the step the run
    starts (or resumes) from."""
    hooks: list[LoopHook] = []
    if cfg.log.wandb is not None:
        hooks.append(WandbTracker(cfg, members, dirs, warn))
    if cfg.log.tensorboard:
        hooks.append(TensorBoardTracker(dirs, warn,
                                        redo_from=start * cfg.optim.batch_size + 1))
    return hooks


class WandbTracker(GuardedHook):
    """One wandb run per SAE: its config, every logged line against `tokens`, the final
    evaluation in the summary (`eval/...`)."""

    key = "wandb"

    def __init__(self, cfg: Config, members: list[Config], dirs: list[Path],
                 warn: Callable[[str], None]):
        super().__init__(warn)
        self.cfg, self.members, self.dirs, self.runs = cfg, members, dirs, []
        self.exit_code = 0
        self._guard("starting the run", self._start)

    def _start(self) -> None:
        import wandb

        spec = self.cfg.log.wandb
        points = self.cfg.sweep.points if self.cfg.sweep is not None else [None]
        group = spec.group or (self.cfg.name if self.cfg.sweep is not None else None)
        for member, directory, point in zip(self.members, self.dirs, points, strict=True):
            id_file = directory / WANDB_ID_FILE
            if id_file.is_file():
                run_id = id_file.read_text().strip()
            else:
                run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                 for _ in range(8))  # as wandb's own ids
                directory.mkdir(parents=True, exist_ok=True)
                atomic_write(id_file, run_id + "\n")
            name = spec.name or self.cfg.name
            if point is not None:
                name = f"{name} ({sweep_label(point)})"
            # console="off": jaxsae's own output (progress, errors) stays as it is
            run = wandb.init(
                project=spec.project, entity=spec.entity, name=name, group=group,
                tags=list(spec.tags), mode=spec.mode, id=run_id, resume="allow",
                dir=str(directory), config=member.to_dict(), reinit="create_new",
                settings=wandb.Settings(console="off", quiet=True))
            run.define_metric("tokens")
            run.define_metric("*", step_metric="tokens")
            self.runs.append(run)
            where = run.url or f"offline, in {run.dir}"
            self.warn(f"wandb: {name}: {where}")

    def on_log(self, done: int, lines: list[dict]) -> None:
        def log():
            for run, line in zip(self.runs, lines, strict=True):
                run.log({k: v for k, v in line.items() if v is not None})

        self._guard("logging", log)

    def on_evaluation(self, index: int, metrics: dict) -> None:
        def summarise():
            self.runs[index].summary.update(
                {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float)})

        self._guard("writing the evaluation", summarise)

    def on_failure(self, error: BaseException) -> None:
        # an interrupt (SIGTERM: 143) saved a checkpoint; the next attempt resumes this run
        self.exit_code = getattr(error, "exit_code", 1)

    def close(self) -> None:
        def finish():
            for run in self.runs:
                run.finish(exit_code=self.exit_code)

        self._guard("finishing the run", finish)
        self.runs = []


class TensorBoardTracker(GuardedHook):
    """One event directory per SAE (`<sae dir>/tensorboard/`), scalars against tokens.
    `redo_from`: the first token count this run logs again; TensorBoard hides the points an
    earlier, interrupted attempt logged from there on (its purge step), as metrics.jsonl drops
    those lines."""

    key = "tensorboard"

    def __init__(self, dirs: list[Path], warn: Callable[[str], None], redo_from: int = 1):
        super().__init__(warn)
        self.dirs, self.writers, self.tokens = dirs, [], 0
        self.redo_from = redo_from
        self._guard("opening the event files", self._open)

    def _open(self) -> None:
        from tensorboardX import SummaryWriter

        # A file of its own per attempt: event files are named by the second they were opened
        # in, and an attempt resumed within the same second would otherwise overwrite the
        # earlier attempt's file.
        suffix = f".{time.time_ns()}"
        self.writers = [SummaryWriter(logdir=str(d / TENSORBOARD_DIR), purge_step=self.redo_from,
                                      filename_suffix=suffix) for d in self.dirs]

    def on_log(self, done: int, lines: list[dict]) -> None:
        def log():
            self.tokens = lines[0]["tokens"]
            for writer, line in zip(self.writers, lines, strict=True):
                for key, value in line.items():
                    if key not in ("step", "tokens") and isinstance(value, int | float):
                        writer.add_scalar(key, value, global_step=line["tokens"])
                writer.flush()

        self._guard("logging", log)

    def on_evaluation(self, index: int, metrics: dict) -> None:
        def log():
            writer = self.writers[index]
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(f"eval/{key}", value, global_step=self.tokens)
            writer.flush()

        self._guard("writing the evaluation", log)

    def close(self) -> None:
        def close():
            for writer in self.writers:
                writer.close()

        self._guard("closing the event files", close)
        self.writers = []
