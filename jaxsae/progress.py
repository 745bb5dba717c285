"""Progress of long work: a bar on a terminal, plain lines anywhere else.

A tqdm bar in a SLURM log or under `nohup` is a stream of carriage returns (a 2,000-step run
wrote ~133 KB of them). When stderr is not a terminal, `Progress` instead prints one complete
line every `JAXSAE_PROGRESS_SECONDS` seconds (default 30) and one at the end, e.g.

    quickstart: 600/1953 step (31%) · 20.1 step/s · tokens 1,228,800 · tok/s 41,165 · loss 0.412
                · L0 12.1 · EV 0.903 · ETA 1m07s

Disabled (`--no-progress`), it prints nothing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

from jaxsae import interrupts
from jaxsae.errors import JaxsaeError

DEFAULT_SECONDS = 30.0


def seconds_between_lines() -> float:
    """JAXSAE_PROGRESS_SECONDS, a number of seconds >= 0 (bad input is refused, naming it;
    fault testing: 'abc' fell back to the default and 'nan' or -1 printed a line a step)."""
    text = os.environ.get("JAXSAE_PROGRESS_SECONDS")
    if text is None:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise JaxsaeError(f"JAXSAE_PROGRESS_SECONDS: {text!r} is not a number of seconds "
                          "(0 or more)")
    return seconds


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _count(n: float, scale: bool) -> str:
    if not scale:
        return f"{n:,.0f}"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


class Progress:
    """tqdm's interface as far as jaxsae uses it: update, set_postfix, write, close, n."""

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it",
                 initial: int = 0, unit_scale: bool = False, enabled: bool = True,
                 stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self._bar = None
        if enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             unit_scale=unit_scale, dynamic_ncols=True, file=self.stream)
        self._start = self._last = time.monotonic()
        self._start_n = initial
        # The rate (and ETA) is measured from the first update on: what comes before it (a
        # first step's compile) is no part of the pace (fault testing: a 13 s run's first
        # line said ETA 3h53m)
        self._first: tuple[float, int] | None = None
        self._every = seconds_between_lines()
        self._closed = False

    def update(self, n: int = 1) -> None:
        interrupts.check_terminated()  # (a SIGTERM whose exception was lost stops here)
        self.n += n
        if self._first is None:
            self._first = (time.monotonic(), self.n)
        if self._bar is not None:
            self._bar.update(n)
        elif (self.enabled and time.monotonic() - self._last >= self._every
              and not (self.total and self.n >= self.total)):
            self._line()  # (the last line, "done", is close()'s: fault testing saw two)

    def set_postfix(self, values: dict[str, Any], refresh: bool = True) -> None:
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=refresh)

    def set_postfix_str(self, text: str) -> None:
        self.set_postfix({"": text})

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n != self._start_n:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        since, first_n = self._first if self._first is not None else (now, self.n)
        rate = (self.n - first_n) / (now - since) if self.n > first_n and now > since else 0.0
        parts = [f"{_count(self.n, self.unit_scale)}"
                 + (f"/{_count(self.total, self.unit_scale)}" if self.total else "")
                 + f" {self.unit}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate < 100
                         else f"{_count(rate, self.unit_scale)} {self.unit}/s")
        parts += [f"{k} {v}".strip() for k, v in self.postfix.items()]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        elif self.total and self.n >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        prefix = f"{self.desc}: " if self.desc else ""
        print(prefix + " · ".join(parts), file=self.stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
