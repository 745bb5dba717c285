"""The tokens an evaluation reads: tokens [start, stop) of a source, block by block, without the
outlier tokens the SAE's training left out.

Training with `data.drop_norm_above: X` never shows the SAE a token whose norm is above X times
the median norm (attention sinks: a few tokens with norms 10-100x the rest). Scored anyway, a
handful of them dominate the squared error: on SmolLM2's layer 15, 22 sink tokens of 65,536
turn an explained variance of 0.73 into -1.05. Every command that evaluates an SAE on data
(`eval --data`, `analyze`, `repair`, `convert`, `stitch`) therefore reads its tokens through a
`Window` that drops the same tokens training did: the multiple is the SAE's own (its cfg.json's
`jaxsae.drop_norm_above`), the median is taken over the window evaluated (sampled evenly), so
the threshold follows the data in front of it. A training run's final evaluation uses the
threshold estimated before training instead (`Window(limit=stats.drop_above)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxsae.data.loader import KeepFn
from jaxsae.data.source import TokenSource, iter_blocks
from jaxsae.data.stats import norm_filter, sample_evenly
from jaxsae.errors import ConfigError, DataError

MEDIAN_SAMPLE = 65536
"""Tokens sampled (evenly over the window) for its median norm."""

TRAINED = "trained"
"""The drop rule of an evaluation that drops what the SAEs' training dropped."""

DropRule = float | None | str
"""A multiple of the median norm, None (keep every token) or TRAINED."""


def _own(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """cfg.json's `jaxsae` block ({} for an SAE trained elsewhere)."""
    own = cfg_json.get("jaxsae")
    return own if isinstance(own, dict) else {}


def drop_multiple(cfg_jsons: Sequence[dict[str, Any]], rule: DropRule = TRAINED
                  ) -> float | None:
    """The multiple of the median norm above which an evaluation of these SAEs (their cfg.json)
    leaves tokens out: `rule` itself unless it is TRAINED; then the smallest `drop_norm_above`
    the SAEs' training used (cfg.json's `jaxsae` block: several SAEs are evaluated on tokens
    each of them was trained on), None when none left any out (e.g. SAEs trained elsewhere)."""
    if rule != TRAINED:
        return None if rule is None else float(rule)
    used = [_own(c).get("drop_norm_above") for c in cfg_jsons]
    used = [float(m) for m in used
            if isinstance(m, int | float) and not isinstance(m, bool) and m > 0]
    return min(used) if used else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def trained_drop(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """What the cfg.json of an SAE made from this one (repaired, converted) keeps of its
    training's tokens: its `drop_norm_above` and `held_out_from` ({} when it records
    neither)."""
    multiple = drop_multiple([cfg_json])
    end = _count(_own(cfg_json).get("held_out_from"))
    return {**({} if multiple is None else {"drop_norm_above": multiple}),
            **({} if end is None else {"held_out_from": end})}


def trained_end(cfg_jsons: Sequence[dict[str, Any]], data: str | Path,
                hook: str | None = None) -> int | None:
    """Where the tokens these SAEs were trained on end in `data` (`hook`: the column of a
    SAELens cache read): a run trains on tokens [0, N) of its data and holds out the rest
    (cfg.json: `jaxsae.held_out_from` N, with `metadata.dataset_path`, and `hook_name`). The
    largest N of the SAEs trained on `data` (and that column); None when none of them says it
    was (trained elsewhere, on other data, or exported before jaxsae recorded it)."""
    here = Path(data).resolve()

    def trained_here(cfg_json: dict[str, Any]) -> bool:
        meta = cfg_json.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        path, column = meta.get("dataset_path"), meta.get("hook_name")
        # (fault testing: another column of the same cache counted as the training tokens)
        return (isinstance(path, str) and Path(path).resolve() == here
                and (hook is None or not isinstance(column, str) or column == hook))

    ends = [_count(_own(c).get("held_out_from")) for c in cfg_jsons if trained_here(c)]
    ends = [end for end in ends if end is not None]
    return max(ends) if ends else None


def training_note(report: dict[str, Any], data: str, what: str = "evaluated") -> str | None:
    """A line for stderr when an evaluation read tokens its SAE was trained on (`report`:
    with `Window.report()`'s `training_tokens`, `held_out_tokens`), else None."""
    trained = report.get("training_tokens")
    if not trained:
        return None
    held = report["held_out_tokens"]
    which = (f"its held-out tokens are the last {held:,} of {data} (--tokens {held})"
             if held else f"its training held none of {data} out")
    return (f"note: {trained:,} of the tokens {what} are tokens the SAE was trained on, not "
            f"held out; {which}")


def describe(report: dict[str, Any]) -> str:
    """`Window.report()` in words, for a Markdown report ("" when it has nothing to say: none
    left out, no training token read or none known)."""
    parts = []
    if "dropped_tokens" in report:
        why = (f" (norm above {report['drop_norm_above']:g}x the median)"
               if "drop_norm_above" in report else "")
        parts.append(f"{report['dropped_tokens']} tokens left out{why}")
    if report.get("training_tokens"):
        parts.append(f"{report['training_tokens']} of those read are training tokens, not "
                     "held out")
    return "; ".join(parts)


OUTLIER_MULTIPLE = 10.0
"""`Window.outliers`'s default: what `configs/smollm2/` train with (data.drop_norm_above)."""


def _sampled_norms(source: TokenSource, start: int, stop: int) -> np.ndarray:
    """The norms (first d_in columns) of up to MEDIAN_SAMPLE tokens spread over [start, stop)."""
    rows = sample_evenly(source, stop, MEDIAN_SAMPLE, start=start,
                         pieces=1 if getattr(source, "iid", False) else 64)
    x = rows[:, :source.d_in].astype(np.float64)
    return np.sqrt(np.einsum("nd,nd->n", x, x))


class Window:
    """Tokens [start, stop) of `source` in blocks of `batch_size`, leaving out those whose norm
    (over the first `d_in` columns: a transcoder's rows carry their targets after them) is
    above `limit` (None: none left out). `dropped` / `kept`: counted by the last complete
    pass."""

    def __init__(self, source: TokenSource, start: int, stop: int | None = None, *,
                 batch_size: int = 4096, limit: float | None = None,
                 multiple: float | None = None, median_norm: float | None = None,
                 trained_end: int | None = None):
        self.source, self.start, self.batch_size = source, start, batch_size
        self.stop = source.n_tokens if stop is None else stop
        self.limit, self.multiple, self.median_norm = limit, multiple, median_norm
        self.trained_end = trained_end
        """The SAEs were trained on tokens [0, trained_end) of the source (None: unknown)."""
        self.dropped: int | None = None
        self.training: int | None = None
        """Kept tokens below trained_end, counted by the last complete pass."""

    @classmethod
    def for_saes(cls, source: TokenSource, data: str | Path, start: int,
                 stop: int | None = None, *, saes: Sequence[dict[str, Any]],
                 rule: DropRule = TRAINED, batch_size: int = 4096) -> Window:
        """The window an evaluation of these SAEs (their cfg.json) reads from `data`: without
        the tokens `rule` leaves out (`drop_multiple`), and counting the tokens of it the
        SAEs were trained on (`trained_end`)."""
        inputs = getattr(source, "inputs", source)  # (a transcoder's pairs: their inputs)
        return cls.dropping(source, start, stop, multiple=drop_multiple(saes, rule),
                            batch_size=batch_size,
                            trained_end=trained_end(saes, data, getattr(inputs, "hook", None)))

    @classmethod
    def dropping(cls, source: TokenSource, start: int, stop: int | None = None, *,
                 multiple: float | None, batch_size: int = 4096,
                 trained_end: int | None = None) -> Window:
        """The window that leaves out tokens above `multiple` times the median norm of its own
        tokens (None: keeps every token)."""
        stop = source.n_tokens if stop is None else stop
        if multiple is None or stop <= start:
            return cls(source, start, stop, batch_size=batch_size, trained_end=trained_end)
        median = float(np.median(_sampled_norms(source, start, stop)))
        if not median > 0:
            raise DataError(f"drop_norm_above ({multiple:g}x the median norm): the median "
                            "norm of the tokens evaluated is 0 (most are zero), so every "
                            "non-zero token would be left out; evaluate every token "
                            "(--all-tokens)")
        return cls(source, start, stop, batch_size=batch_size, limit=multiple * median,
                   multiple=multiple, median_norm=median, trained_end=trained_end)

    def outliers(self, multiple: float = OUTLIER_MULTIPLE) -> tuple[int, int]:
        """(how many of the sampled tokens have a norm above `multiple` times the sample's
        median, how many were sampled): for a note when a window that keeps every token holds
        attention sinks."""
        if self.stop <= self.start:
            return 0, 0
        norms = _sampled_norms(self.source, self.start, self.stop)
        median = np.median(norms)
        if not median > 0:  # mostly zero tokens: the non-zero ones are not outliers
            return 0, len(norms)
        return int(np.sum(norms > multiple * median)), len(norms)

    @property
    def tokens(self) -> int:
        """Tokens in the window, dropped ones included."""
        return self.stop - self.start

    @property
    def kept(self) -> int | None:
        """Tokens read, dropped ones excluded (None until a pass is complete)."""
        return None if self.dropped is None else self.tokens - self.dropped

    @property
    def keep_fn(self) -> KeepFn | None:
        """[n, width] rows -> [n] bool: the ones an evaluation reads (None: all)."""
        return None if self.limit is None else norm_filter(self.limit, self.source.d_in)

    def masked(self) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(first token, block, kept rows or None for all) for every block, dropped rows
        included: for readers that align other per-token data with the rows (true codes)."""
        keep, dropped, training = self.keep_fn, 0, 0
        end = self.start if self.trained_end is None else self.trained_end
        for lo, block in zip(range(self.start, self.stop, self.batch_size),
                             iter_blocks(self.source, self.batch_size, self.start, self.stop),
                             strict=True):
            mask = None if keep is None else keep(block)
            if mask is not None:
                dropped += int(len(mask) - mask.sum())
            below = min(max(end - lo, 0), len(block))  # rows of the block the SAEs trained on
            training += below if mask is None else int(mask[:below].sum())
            yield lo, block, mask
        if keep is not None and self.tokens and dropped == self.tokens:
            multiple = "" if self.multiple is None else f"{self.multiple:g}x the median, "
            raise ConfigError(f"drop_norm_above: every one of the {self.tokens} tokens "
                              f"evaluated has a norm above {multiple}{self.limit:.4g}: none "
                              "left to evaluate (a larger multiple; the analysis commands "
                              "also take --all-tokens)")
        self.dropped, self.training = dropped, training

    def blocks(self, progress: Callable[[int], Any] | None = None) -> Iterator[np.ndarray]:
        """The kept rows of every block (blocks left empty are skipped); `progress` is called
        with each block's length, dropped rows included."""
        for _, block, mask in self.masked():
            if progress is not None:
                progress(len(block))
            if mask is not None:
                block = block[mask]
            if len(block):
                yield block

    def report(self) -> dict[str, Any]:
        """What an evaluation says of the tokens it read: how many were left out, and why; and,
        when the SAEs say where their training tokens end in this data, how many of the
        tokens read were training tokens (`training_tokens`) and how many tokens at the
        data's end training held out (`held_out_tokens`)."""
        out: dict[str, Any] = {}
        if self.limit is not None:
            out["dropped_tokens"] = self.dropped
            if self.multiple is not None:
                out.update(drop_norm_above=self.multiple, median_norm=self.median_norm)
        if self.trained_end is not None:
            out.update(training_tokens=self.training,
                       held_out_tokens=max(self.source.n_tokens - self.trained_end, 0))
        return out
