"""Training curves: `curves.png` from `metrics.jsonl`, against tokens.

Panels: the loss (total solid, each term dashed, before its coefficient), L0, explained
variance, dead fraction, the learning rate and the gradient norm. A sweep's SAEs, or several
runs (`jaxsae plot`), are overlaid, one colour each. The run writes its `curves.png` at
checkpoints (at most once a minute) and at the end (`CurvesHook`); `plot()` draws any set of
runs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxsae.config import load_config, sweep_label
from jaxsae.errors import DataError
from jaxsae.hooks import GuardedHook
from jaxsae.outputs import CURVES, output_kind, plain_text, save_figure, subplots

# (a term is drawn before its coefficient, as metrics.jsonl logs it: it may lie above the total;
# fault testing read an L1 term above the total as a wrong plot)
PANELS = (("loss", "loss (terms before their coefficients)"), ("l0", "L0"),
          ("explained_variance", "explained variance"),
          ("dead_fraction", "dead fraction"), ("lr", "learning rate"),
          ("grad_norm", "gradient norm"))
Series = tuple[str, list[dict]]


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl (a line cut by a kill, or garbled, is skipped: one whose
    tokens are not a finite number too; fault testing: tracebacks, or a categorical axis)."""
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        tokens = _number(line.get("tokens")) if isinstance(line, dict) else None
        if tokens is not None and math.isfinite(tokens):
            lines.append(line)
    return lines


def _number(value: Any) -> float | None:
    """`value` as a float if it is a JSON number that a float holds (else None: an integer
    of 300 digits, a string, a bool); infinities and NaN stay."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def run_series(run_dir: Path, label: str | None = None,
               until: int | None = None) -> list[Series]:
    """(label, metrics lines) of a run: one, or one per SAE of a sweep; with `until`, the
    lines to that step (a checkpoint's)."""
    return [(name, [line for line in read_metrics(path)
                    if until is None or (_number(line.get("step")) or 0) <= until])
            for name, path in run_metrics(run_dir, label)]


def run_metrics(run_dir: Path, label: str | None = None) -> list[tuple[str, Path]]:
    """(label, metrics.jsonl) of a run: one, or one per SAE of a sweep."""
    run_dir = Path(run_dir)
    name = label or run_dir.name
    sweep = run_dir / "sweep"
    if (run_dir / "metrics.jsonl").is_file() and not sweep.is_dir():
        return [(name, run_dir / "metrics.jsonl")]
    if sweep.is_dir():
        members = sorted((p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()),
                         key=lambda p: int(p.name) if p.name.isdigit() else 0)
        points = _sweep_points(run_dir)
        out = []
        for member in members:
            i = int(member.name) if member.name.isdigit() else -1
            what = sweep_label(points[i]) if 0 <= i < len(points) else member.name
            out.append((f"{name} ({what})", member / "metrics.jsonl"))
        return out
    if not run_dir.exists():  # (fault testing: "no metrics.jsonl" of a mistyped path)
        raise DataError(f"{run_dir}: does not exist (expected a jaxsae run directory)")
    if _run_config(run_dir) is not None:  # a run that has logged nothing yet (an import's,
        return []  # one starting; fault testing: "not a jaxsae run directory")
    if output_kind(run_dir) == "bench":  # (fault testing: "not a jaxsae run directory")
        arms = sorted(str(p) for p in run_dir.iterdir() if (p / "config.yaml").is_file())
        raise DataError(f"{run_dir}: a jaxsae bench directory; give the runs of its arms"
                        + (f" ({' '.join(arms)})" if arms else ", once they have trained"))
    raise DataError(f"{run_dir}: no metrics.jsonl (not a jaxsae run directory)")


def _run_config(run_dir: Path):
    """The run's config, None if it has no valid jaxsae config.yaml."""
    try:
        return load_config(run_dir / "config.yaml")
    except Exception:
        return None


def _sweep_points(run_dir: Path) -> list:
    cfg = _run_config(run_dir)  # (labels only: without it, the SAE's index)
    return list(cfg.sweep.points) if cfg is not None and cfg.sweep is not None else []


_LEGEND_RUNS = 40
"""At most this many runs are named in the legend (the rest are counted)."""
_PANELS_RIGHT = 0.84
"""Where an overlay's panels end (a fraction of the width); its legend stands beside them."""


def plot(series: list[Series], out: Path, title: str = "") -> Path:
    """Draws the panels for every (label, lines) into `out` (a PNG, written atomically). One
    run: a colour per loss term. Several: a colour per run and a line style per term, in a
    legend beside the panels that names every run (fault testing: a legend cut at 16 of its
    runs × terms entries left most SAEs of a sweep or a bench unnamed)."""
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    many = len(series) > 1
    fig, axes = subplots(2, 3, figsize=(15 + (3 if many else 0), 8))
    colors = _run_colors(len(series)) if many else matplotlib.rcParams[
        "axes.prop_cycle"].by_key()["color"]
    styles = ("--", ":", "-.", (0, (5, 1, 1, 1)))
    term_style: dict[str, Any] = {"total": "-"}
    tables = [_columns(lines) for _, lines in series]
    for (key, name), ax in zip(PANELS, axes.flat, strict=True):
        logged = drawn = positive = False
        for i, table in enumerate(tables):
            terms = sorted(k for k in table if k.startswith("loss.")) if key == "loss" else []
            for j, k in enumerate([key, *terms]):
                if k not in table:
                    continue
                xs, ys = thin(*table[k])
                positive = positive or any(y > 0 for y in ys)
                what = "total" if j == 0 else k[len("loss."):]
                if not many:  # one run: a colour per term, the total in black
                    color, style = ("black", "-") if j == 0 else (colors[(j - 1) % len(colors)],
                                                                  "--")
                else:  # runs overlaid: a colour per run, a line style per term
                    color = colors[i]
                    style = term_style.setdefault(what, styles[(len(term_style) - 1)
                                                               % len(styles)])
                # (a lone point, a run shorter than two log.every_steps or a finite value
                # between non-finite ones, is a marker: a line through one point draws
                # nothing, fault testing)
                lone = _lone_points(ys)
                ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.4 if j == 0 else 1.0,
                        marker="o" if lone else None, markevery=lone or None, markersize=4,
                        label=plain_text(what) if key == "loss" and not many else None)
                logged, drawn = True, drawn or any(math.isfinite(y) for y in ys)
        ax.set_title(name)
        ax.set_xlabel("tokens")
        # (fault testing: 125000, 150000, ... ran into one another below the panel; a run
        # of 100k to 1M tokens read "175000200000")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if key in ("loss", "grad_norm") and positive:  # (a log scale needs a value > 0)
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "never finite" if logged else "not logged", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
    if many:
        named = series[:_LEGEND_RUNS]
        handles = [Line2D([], [], color=colors[i], linewidth=2) for i in range(len(named))]
        labels = [plain_text(label) for label, _ in named]
        if len(series) > len(named):
            handles.append(Line2D([], [], color="none"))
            labels.append(f"... and {len(series) - len(named)} more")
        if len(term_style) > 1:  # the line styles of the loss panel
            handles += [Line2D([], [], color="gray", linestyle=style)
                        for style in term_style.values()]
            labels += [f"loss: {plain_text(what)}" for what in term_style]
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(_PANELS_RIGHT, 0.5),
                   fontsize=7, frameon=False)
    else:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            # (a falling loss leaves its upper right free; "best" searches every point, slowly
            # and with a warning, for a long run)
            axes.flat[0].legend(handles, labels, fontsize=7, loc="upper right")
    if title:
        fig.suptitle(plain_text(title))
    save_figure(fig, out, right=_PANELS_RIGHT if many else 1.0)
    return out


def _columns(lines: list[dict]) -> dict[str, tuple[list, list]]:
    """key -> (tokens, values) of the lines' numbers, in one pass over the lines; a null (a
    NaN or inf, as metrics.jsonl writes it) is a NaN, drawn as a gap (fault testing: the
    steps a run skipped as non-finite were bridged by a straight line, as if measured)."""
    table: dict[str, tuple[list, list]] = {}
    for line in lines:
        tokens = float(line["tokens"])  # (a finite number: `read_metrics`)
        for k, v in line.items():
            if (v := math.nan if v is None else _number(v)) is not None:
                xs, ys = table.setdefault(k, ([], []))
                xs.append(tokens)
                ys.append(v)
    return table


def _lone_points(ys: Sequence[float]) -> list[int]:
    """The indices of the finite values whose neighbours are not finite (or absent)."""
    finite = [math.isfinite(y) for y in ys]
    return [i for i, ok in enumerate(finite)
            if ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(ys) and finite[i + 1])]


PLOT_POINTS = 2000
"""A series longer than this is drawn from its extremes (`thin`): a drawing's cost stays
bounded however long the run (fault testing: a week-long run's 200k lines took 5 s a
redraw, inside the training loop)."""


def thin(xs: Sequence[float], ys: Sequence[float],
         limit: int = PLOT_POINTS) -> tuple[Sequence[float], Sequence[float]]:
    """At most `limit` points of a series in order: split into (limit - 2) // 2 runs of
    consecutive points, each run keeps its lowest and its highest point (a spike, a
    collapse, stays visible at any length; the first and last points are kept)."""
    n = len(xs)
    if n <= limit:
        return xs, ys
    runs = max(1, (limit - 2) // 2)
    bucket = np.arange(n) * runs // n
    values = np.asarray(ys, dtype=np.float64)
    nan = np.isnan(values)  # (neither a run's lowest nor its highest: a review found a NaN,
    # which sorts last, hiding a run's spike; matplotlib draws it as a gap either way)
    keep = {0, n - 1}
    for pick, fill in ((0, np.inf), (-1, -np.inf)):  # each run's lowest, then its highest
        order = np.lexsort((np.where(nan, fill, values), bucket))  # by run, then value
        first = np.searchsorted(bucket[order], np.arange(runs))
        at = first if pick == 0 else np.append(first[1:], n) - 1
        keep.update(order[at].tolist())
    index = sorted(keep)
    return [xs[i] for i in index], [ys[i] for i in index]


def _run_colors(n: int) -> list:
    """n colours told apart: matplotlib's 10 (20) categorical ones while they suffice, then
    evenly spaced along a perceptually ordered map."""
    from matplotlib import colormaps

    if n <= 10:
        return list(colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(colormaps["tab20"].colors[:n])
    cmap = colormaps["turbo"]
    return [cmap(i / (n - 1)) for i in range(n)]


class CurvesHook(GuardedHook):
    """Redraws `<run>/curves.png` from the metrics files at checkpoints, at most once every
    `min_interval_s` and never more than `max_share` of the training's time (a drawing reads
    every line of the metrics: ~1 s for a week-long run's 200k), and always at the last one,
    the end of the run. A failure to draw warns once and training goes on; a file system's error
    (a full disk) is tried again at the next checkpoint (fault testing: one failed drawing
    left the run with the curves.png of its first steps)."""

    key = "curves"
    min_interval_s = 60.0
    max_share = 0.02
    """The next drawing waits at least the last one's time over this (a drawing of 2 s: 100
    s)."""
    retries_os_errors = True

    def __init__(self, run_dir: Path, title: str, total_steps: int,
                 warn: Callable[[str], None]):
        super().__init__(warn)
        self.run_dir, self.title, self.total = run_dir, title, total_steps
        self.last = -math.inf
        self.took = 0.0

    def on_checkpoint(self, step: int) -> None:
        now = time.monotonic()
        wait = max(self.min_interval_s, self.took / self.max_share)
        if step >= self.total or now - self.last >= wait:
            final = step >= self.total
            drawn = self._guard(f"drawing {CURVES}", self.draw,
                                again="" if final else "and tries again at the next checkpoint")
            if drawn:
                self.last = now  # (a failed drawing is tried again at the next checkpoint)
                self.took = time.monotonic() - now

    def draw(self) -> None:
        series = [s for s in run_series(self.run_dir, self.title) if s[1]]
        if series:
            plot(series, self.run_dir / CURVES, title=self.title)
