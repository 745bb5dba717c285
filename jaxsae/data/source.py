"""Token sources: what the loader reads from, and the array-list source both formats build on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxsae.errors import DataError


class TokenSource(Protocol):
    """Tokens [0, n_tokens) of `width` columns, read as float32 ranges: d_in of them the
    dictionary's input, the other d_out (0 but for a transcoder's paired data) its targets.
    (The loader takes a source without `width` / `d_out` as inputs alone.)"""

    @property
    def d_in(self) -> int: ...

    @property
    def d_out(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def n_tokens(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArraySource:
    """A list of (memory-mapped) arrays [n_i, d_in], addressed as one run of tokens."""

    def __init__(self, arrays: Sequence[np.ndarray], names: Sequence[str], d_in: int):
        self.arrays = list(arrays)
        self.names = list(names)
        self._d_in = d_in
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    @property
    def d_in(self) -> int:
        return self._d_in

    d_out = 0
    """Targets of a transcoder (`PairedSource`); none here."""

    @property
    def width(self) -> int:
        return self._d_in

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as float32 [stop - start, d_in]."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        if start == stop:
            return np.empty((0, self.d_in), np.float32)
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(first, len(self.arrays)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            parts.append(self.arrays[i][max(start, lo) - lo : min(stop, hi) - lo])
        out = np.concatenate(parts) if len(parts) != 1 else parts[0]
        with np.errstate(over="ignore"):  # (float64 beyond float32: inf, refused where read)
            return np.asarray(out, dtype=np.float32)

    def scan(self, rows_per_read: int = 65536) -> Iterator[tuple[str, np.ndarray]]:
        """Every token once, file by file, as (file name, float32 block); refuses NaN / inf,
        naming the file and the first bad row range."""
        for name, array in zip(self.names, self.arrays, strict=True):
            for lo in range(0, len(array), rows_per_read):
                with np.errstate(over="ignore"):
                    block = np.asarray(array[lo : lo + rows_per_read], dtype=np.float32)
                bad = ~np.isfinite(block).all(axis=1)
                if bad.any():
                    rows = np.flatnonzero(bad) + lo
                    where = (f"row {rows[0]}" if len(rows) == 1 else
                             f"rows {rows[0]}..{rows[-1]} ({len(rows)} of them in this block)")
                    raw = np.asarray(array[rows[0]])
                    if np.isfinite(raw).all():  # (fault testing: float64 "non-finite")
                        raise DataError(f"{name}: values beyond float32's range in {where} "
                                        f"(the first holds {np.abs(raw).max():.3g}; jaxsae "
                                        "computes in float32): rescale the data")
                    raise DataError(f"{name}: non-finite values in {where}")
                yield name, block

    def locate(self, token: int) -> tuple[str, int]:
        """(file name, row in that file) of global token index `token`."""
        i = int(np.searchsorted(self.offsets, token, side="right")) - 1
        return self.names[i], token - int(self.offsets[i])

    def check_finite(self, rows_per_read: int = 65536) -> None:
        """Refuses NaN / inf, naming the file and the first bad row range (one full read)."""
        for _ in self.scan(rows_per_read):
            pass


def refuse_links(files: Sequence[Path]) -> None:
    """Refuses two names of one file (a symbolic or hard link among a directory's files),
    naming both: its tokens would be read twice, some as training tokens and again as
    held-out ones (fault testing: the check of a name listed twice let a link through)."""
    seen: dict[tuple[int, int], Path] = {}
    for file in files:
        st = os.stat(file)
        first = seen.setdefault((st.st_dev, st.st_ino), file)
        if first != file:
            raise DataError(f"{file}: the same file as {first} (a link; its tokens would be "
                            "read twice)")


class PairedSource:
    """A transcoder's data: row i is input row i (d_in wide) followed by target row i (d_out
    wide), so the loader shuffles, splits and resumes pairs exactly as it does tokens. Shard
    directories must hold the same shards in the same order (checked shard by shard); a
    SAELens cache (whose files are record batches, not shards) must hold the same number of
    tokens."""

    def __init__(self, inputs: ArraySource, targets: ArraySource, *, by_file: bool = True):
        if not by_file:
            if inputs.n_tokens != targets.n_tokens:
                raise DataError(f"data.target (--target): {targets.n_tokens} tokens, but "
                                f"data.path (--data) has {inputs.n_tokens}; the targets must "
                                "be paired row by row")
        elif len(inputs.arrays) != len(targets.arrays):
            raise DataError(f"data.target (--target): {len(targets.arrays)} shards, but "
                            f"data.path (--data) has {len(inputs.arrays)}; the targets must be "
                            "paired row by row")
        else:
            for x, y, x_name, y_name in zip(inputs.arrays, targets.arrays, inputs.names,
                                            targets.names, strict=True):
                if len(x) != len(y):
                    raise DataError(f"{y_name}: {len(y)} rows, but its input shard {x_name} "
                                    f"has {len(x)}; the targets must be paired row by row")
        self.inputs, self.targets = inputs, targets
        self.names = inputs.names
        self.manifest = getattr(inputs, "manifest", None)  # what wrote the inputs

    @property
    def d_in(self) -> int:
        return self.inputs.d_in

    @property
    def d_out(self) -> int:
        return self.targets.d_in

    @property
    def width(self) -> int:
        return self.d_in + self.d_out

    @property
    def n_tokens(self) -> int:
        return self.inputs.n_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 [stop - start, d_in + d_out]: inputs, then targets."""
        return np.concatenate([self.inputs.read(start, stop), self.targets.read(start, stop)],
                              axis=1)

    def locate(self, token: int) -> tuple[str, int]:
        return self.inputs.locate(token)

    def check_finite(self, rows_per_read: int = 65536) -> None:
        self.inputs.check_finite(rows_per_read)
        self.targets.check_finite(rows_per_read)


def iter_blocks(source: TokenSource, block_tokens: int, start: int = 0,
                stop: int | None = None) -> Iterator[np.ndarray]:
    """Contiguous float32 blocks of tokens [start, stop) in order (for evaluation passes).
    A block with NaN / inf is refused, naming the file and rows: a metric computed over it
    would be NaN, not a measurement."""
    stop = source.n_tokens if stop is None else stop
    for lo in range(start, stop, block_tokens):
        block = source.read(lo, min(lo + block_tokens, stop))
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            first, last = (int(np.flatnonzero(bad)[i]) + lo for i in (0, -1))
            files = source
            if isinstance(source, PairedSource) and np.isfinite(
                    block[bad][:, :source.d_in]).all():  # (the targets': name their file)
                files = source.targets
            if isinstance(files, ArraySource | PairedSource):
                (name, row), (last_name, last_row) = files.locate(first), files.locate(last)
                rows = (f"row {row}" if first == last else f"rows {row}..{last_row}"
                        if last_name == name else f"from row {row}")
            else:
                name = "data"
                rows = f"token {first}" if first == last else f"tokens {first}..{last}"
            count = int(bad.sum())
            raise DataError(f"{name}: non-finite values (NaN or inf) in {rows} ({count} "
                            f"token{'s' if count > 1 else ''} of the ones evaluated): no metric "
                            "over them would be a measurement; repair the data")
        yield block


FINGERPRINT_ROWS = 4096
"""Evenly spaced rows `fingerprint` reads (a few milliseconds)."""


def fingerprint(source: TokenSource) -> str:
    """A short digest of what `source` holds: its size and width, and the values of
    FINGERPRINT_ROWS rows evenly spaced over its tokens (the first and last among them). It
    depends on the tokens alone: data moved, copied, or written again into files split
    elsewhere keeps it (fault testing: a fingerprint of the files' first and last rows refused
    the same data re-split); a file replaced or edited in place, even by one of the same size,
    changes it whenever it holds a row read (any file longer than 1/4096 of the data). A
    checkpoint keeps it to refuse resuming on other data, and the processes of a run compare
    theirs."""
    n = source.n_tokens
    h = hashlib.blake2b(f"{n} {getattr(source, 'width', source.d_in)}".encode(),
                        digest_size=8)
    for row in np.unique(np.linspace(0, max(n - 1, 0), num=min(FINGERPRINT_ROWS, n),
                                     dtype=np.int64)):
        h.update(np.ascontiguousarray(source.read(int(row), int(row) + 1), np.float32).tobytes())
    return h.hexdigest()
