"""What the training loop reports and listens to.

The loop tells its hooks (`LoopHook`) what happened: every step, every logged step (one line
of metrics per SAE: `metrics.jsonl`, the progress display, and whatever else a hook sends
them to), every checkpoint, and the end. `MetricLogger` turns the device metrics of a step,
fetched one step late, into those lines and stops a run that went non-finite
(`interrupts.SignalFlag` turns SIGINT / SIGTERM into a checkpoint and a clean exit).

Adding a destination for the metrics (an experiment tracker, say) is a `LoopHook` subclass
passed to `train(hooks=...)`; nothing in the loop changes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxsae import penalties
from jaxsae.config import TERM_COEFFICIENT, Config, sweep_label
from jaxsae.errors import ConfigError, JaxsaeError, NonFiniteError, describe_os_error
from jaxsae.outputs import AppendLog, atomic_write, json_text


class Interrupted(JaxsaeError):
    """SIGINT / SIGTERM: a checkpoint was saved; rerunning the same command resumes."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def truncate_metrics(path: Path, step: int) -> str | None:
    """Drops lines logged after the checkpoint, so the resumed file reads like one run; what
    to tell the user when a resumed run's log lacks steps before it (the file is gone, or
    lines that do not read were dropped), else None."""
    if not path.exists():
        return (f"{path}: not found; the resumed run logs the steps after {step} only"
                if step else None)
    kept, unreadable = [], 0
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            # the last line cut by a kill goes quietly: a kill cuts one logged after the
            # checkpoint, which is dropped anyway
            unreadable += i < len(lines) - 1
    atomic_write(path, "".join(k + "\n" for k in kept))
    if unreadable:
        return f"{path}: dropped {unreadable} line(s) that do not read as JSON metrics"
    return None


class LoopHook:
    """Told by the training loop what happened; every method may be left as it is (nothing).
    Hooks run on every process: one that writes files acts on process 0 only."""

    def on_step(self, done: int) -> None:
        """After step `done` (1-based), once its metrics were checked."""

    def on_log(self, done: int, lines: list[dict]) -> None:
        """At a logged step: one line per SAE (a sweep: in the order of its points), each
        `{"step", "tokens", "tokens_per_s", "loss", "loss.<term>", "l0", ...}`."""

    def on_checkpoint(self, step: int) -> None:
        """After the checkpoint of `step` was handed to the checkpointer (the last one: the end
        of the loop)."""

    def on_evaluation(self, index: int, metrics: dict) -> None:
        """The final evaluation of SAE `index` (eval.json), once training finished."""

    def on_failure(self, error: BaseException) -> None:
        """The run stops with `error` (an interrupt that saved a checkpoint included); `close`
        follows."""

    def close(self) -> None:
        """At the end of the run, finished or not."""


class GuardedHook(LoopHook):
    """A hook whose failure must not stop training (a tracker, a plot): run its work through
    `_guard`, which turns the first failure into one warning and switches the hook off."""

    key = ""
    """What it is, as the config names it (`wandb`, `tensorboard`, `curves`)."""
    retries_os_errors = False
    """Whether an OSError (a full disk) leaves the hook on, to try again next time: for a
    hook whose next call redoes all of its work (a drawing), not one that would have lost
    some (a tracker's stream)."""

    def __init__(self, warn: Callable[[str], None]):
        self.warn, self.failed, self.warned = warn, False, False

    def _guard(self, what: str, action: Callable[[], object], *,
                again: str = "and tries again at the next checkpoint") -> bool:
        """Runs `action`; whether it succeeded. `again`: what the warning says comes next
        for a failure tried again ("": nothing, the last try)."""
        if self.failed:
            return False
        try:
            action()
            return True
        except Exception as e:  # whatever failed: warn once, go on
            retry = self.retries_os_errors and isinstance(e, OSError)
            self.failed = not retry
            if self.warned and again:
                return False
            self.warned = True
            reason = (describe_os_error(e) if isinstance(e, OSError)
                      else " ".join(str(e).split()) or type(e).__name__)
            then = ("training goes on without it (metrics.jsonl has every number)" if not retry
                    else f"training goes on {again}" if again
                    else "it is left as it was last drawn (metrics.jsonl has every number)")
            self.warn(f"warning: log.{self.key}: {what} failed ({reason[:300]}); {then}")
            return False


class MetricsFiles(LoopHook):
    """`metrics.jsonl` of each SAE: a line is written whole or not at all (disk full); NaN
    and inf are written as null (strict JSON)."""

    def __init__(self, paths: list[Path]):
        self.files = [AppendLog(path) for path in paths]

    def on_log(self, done: int, lines: list[dict]) -> None:
        for line, file in zip(lines, self.files, strict=True):
            file.write_line(json_text(line, indent=None))

    def close(self) -> None:
        for file in self.files:
            file.close()


class ProgressDisplay(LoopHook):
    """The progress bar (or plain lines in a log file): steps, and at logged steps tokens,
    throughput, loss, L0 and explained variance (the range over a sweep's SAEs).

    The throughput is the tokens a second over the last `span_s` seconds of logged steps
    (metrics.jsonl's `tokens_per_s` is each log interval's own: one holding a checkpoint's
    save reads low, the next may read high; fault testing saw the bar's tok/s jump between
    14k and 653k beside a steady step/s)."""

    span_s = 300.0

    def __init__(self, bar):
        self.bar = bar
        self.marks: collections.deque[tuple[float, int]] = collections.deque()

    def on_step(self, done: int) -> None:
        if not self.marks:  # (the first step's end: its compile is no part of the pace)
            self.marks.append((time.perf_counter(), done))
        self.bar.update(done - self.bar.n)

    def on_log(self, done: int, lines: list[dict]) -> None:
        now = time.perf_counter()
        self.marks.append((now, done))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.span_s:
            self.marks.popleft()
        since, first = self.marks[0]
        batch = lines[0]["tokens"] / done
        rate = ((done - first) * batch / (now - since) if done > first and now > since
                else lines[0]["tokens_per_s"])
        self.bar.set_postfix(_postfix(done, lines[0]["tokens"], rate, lines), refresh=False)

    def close(self) -> None:
        self.bar.close()


SKIPPED_IN_A_ROW = 100
"""With optim.skip_nonfinite, this many steps in a row skipped by every SAE stop the run: it
no longer trains (fault testing: a diverged run skipped its remaining steps, checkpointing
its non-finite parameters)."""


class MetricLogger:
    """Turns the device metrics of a step (fetched one step late) into checks and, every
    log.every_steps, one line per SAE for the hooks (a sweep's metrics have a leading SAE
    axis)."""

    def __init__(self, cfg: Config, start: int, hooks: list[LoopHook], *,
                 dropped: Callable[[dict], int | None], scale: float = 1.0):
        """`dropped`: a loader position -> the tokens the norm filter left out up to it
        (None: not known; every process calls it at the same steps). `scale`: the factor
        normalisation multiplied the reconstructed activations by (the targets', for a
        transcoder): the step's `mse` is divided by its square."""
        self.cfg, self.hooks, self.dropped = cfg, hooks, dropped
        self.mse_unit = float(scale) ** 2
        self.skipping = 0  # steps in a row skipped (optim.skip_nonfinite) by every SAE
        self.last_time, self.last_step = time.perf_counter(), start
        self.labels = penalties.term_labels(cfg.loss)
        self.points = cfg.sweep.points if cfg.sweep is not None else None

    def _coefficient_key(self, member: int, index: int) -> str:
        """The key that sets term `index`'s coefficient for SAE `member`: its sweep's, if the
        sweep sets it (an override of it is refused), else `Config.term_keys`' (a review: the
        advice named keys that were refused or did not exist, `loss.l1_1`)."""
        for key in self.points[member] if self.points is not None else ():
            found = TERM_COEFFICIENT.fullmatch(key)
            with contextlib.suppress(ConfigError):
                if found and self.cfg.term_index(found[1]) == index:
                    return f"sweep.{key}"
        return f"{self.cfg.term_keys()[index]}.coefficient"

    def record(self, step: int, metrics: dict, position: dict) -> None:
        """`position`: the loader's after the step's batch."""
        fetched = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        n = 1 if self.points is None else len(self.points)
        hosts = [{k: (v if self.points is None else v[i]).item() for k, v in fetched.items()}
                 for i in range(n)]
        for host in hosts:
            host["mse"] /= self.mse_unit
        done = step + 1
        for i, host in enumerate(hosts):
            if not host["finite"] and not self.cfg.optim.skip_nonfinite:
                bad = [label for label in self.labels
                       if not math.isfinite(host.get(f"loss.{label}", 0.0))]
                culprit, advice, largest = f"term(s) {', '.join(bad)}", "optim.lr", ""
                if not bad:  # the largest term, the likeliest cause (fault testing: an l1
                    # coefficient of 1e30 was blamed on the learning rate or the data)
                    member = self.cfg.sweep_configs()[i]  # (the terms are logged
                    # unweighted: times the coefficient at this step, its ramp included)
                    total = member.optim.total_steps
                    terms = {label: abs(term.coefficient * host.get(f"loss.{label}", 0.0)
                                        * min(1.0, done / max(term.ramp(total), 1)))
                             for label, term in zip(self.labels, member.loss, strict=True)}
                    top = max(terms, key=terms.get, default=None)
                    culprit = "the gradient"
                    if top is not None and terms[top] > 0:
                        largest = f"; the largest term: {top} = {terms[top]:.3g}"
                        index = self.labels.index(top)
                        if member.loss[index].term != "mse":
                            advice = f"optim.lr or {self._coefficient_key(i, index)}"
                which = ("" if self.points is None
                         else f" of sweep SAE {i} ({sweep_label(self.points[i])})")
                raise NonFiniteError(
                    f"non-finite loss or gradient{which} at step {done} ({culprit} non-finite: "
                    f"loss={host['loss']}, grad_norm={host['grad_norm']}{largest}); no "
                    f"checkpoint is written after it. Lower {advice} or check the data (jaxsae "
                    "data inspect names NaN / inf and tokens too large for float32)"
                )
        if self.cfg.optim.skip_nonfinite:
            self.skipping = 0 if any(host["finite"] for host in hosts) else self.skipping + 1
            if self.skipping >= SKIPPED_IN_A_ROW:
                raise NonFiniteError(
                    f"optim.skip_nonfinite: the last {self.skipping} steps (to step {done}) "
                    "were all skipped, their loss or gradient non-finite: the parameters "
                    "diverged (lower optim.lr) or most batches hold NaN / inf (jaxsae data "
                    f"inspect names them); checkpoints after step {done - self.skipping} hold "
                    "the state they kept, and none is written after this one")
        for host in hosts:
            host.pop("finite")
        for hook in self.hooks:
            hook.on_step(done)
        if done % self.cfg.log.every_steps and done != self.cfg.optim.total_steps:
            return
        now = time.perf_counter()
        tokens_per_s = (done - self.last_step) * self.cfg.optim.batch_size / (now - self.last_time)
        self.last_time, self.last_step = now, done
        lines = []
        dropped = None if self.cfg.data.drop_norm_above is None else self.dropped(position)
        for host in hosts:
            if not self.cfg.optim.skip_nonfinite:
                host.pop("skipped_steps")
            line = {"step": done, "tokens": done * self.cfg.optim.batch_size,
                    "tokens_per_s": round(tokens_per_s, 1), **host}
            if dropped is not None:
                line["dropped_tokens"] = dropped
            lines.append(line)
        for hook in self.hooks:
            hook.on_log(done, lines)


def _postfix(done: int, tokens: int, tokens_per_s: float, lines: list[dict]) -> dict[str, str]:
    """Progress-bar figures: the values of a single run, the range over a sweep's SAEs, as of
    the last logged step (named, as the bar's count moves on between logs)."""

    def show(key: str, fmt: str) -> str:
        values = [line[key] for line in lines]
        lo, hi = min(values), max(values)
        return format(lo, fmt) if lo == hi else f"{lo:{fmt}}..{hi:{fmt}}"

    return {"log step": f"{done:,}", "tokens": f"{tokens:,}", "tok/s": f"{tokens_per_s:,.0f}",
            "loss": show("loss", ".4g"),
            "L0": show("l0", ".1f"), "EV": show("explained_variance", ".3f")}
