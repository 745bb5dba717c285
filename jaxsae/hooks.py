"""What the training loop reports and listens to: the metrics of each step (fetched one step
late, checked for NaN, written to metrics.jsonl and the progress display) and SIGINT / SIGTERM
(a checkpoint, then a clean exit).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxsae import penalties
from jaxsae.config import Config, sweep_label
from jaxsae.data.loader import Loader
from jaxsae.errors import JaxsaeError, NonFiniteError
from jaxsae.outputs import atomic_write, json_text


class Interrupted(JaxsaeError):
    """SIGINT / SIGTERM: a checkpoint was saved; rerunning the same command resumes."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def truncate_metrics(path: Path, step: int) -> None:
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


class MetricLogger:
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


class SignalFlag:
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
