"""The jaxsae shard format: a directory with `manifest.json` and shard files.

    {"format": "jaxsae.shards", "version": 1, "d_in": 576, "dtype": "float32",
     "shards": [{"file": "shard-00000.npy", "n_tokens": 65536}], "source": {...}}

A shard is a `.npy` array [n_tokens, d_in] (float32 or float16) or a `.safetensors` file with one
tensor `activations` [n_tokens, d_in] (float32, float16 or bfloat16). Readers memory-map and
validate every shard against the manifest when the set is opened; writers stage the directory
and rename it into place, so a set is either complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pyarrow as pa

from jaxsae import interrupts, outputs, tensorfile
from jaxsae.data.source import ArraySource, refuse_links
from jaxsae.errors import DataError
from jaxsae.parsing import is_positive_int, python_value
from jaxsae.runlock import LOCK_FILE, RunLock

FORMAT = "jaxsae.shards"
VERSION = 1
MANIFEST = "manifest.json"
TARGET_DIR = "target"
"""A transcoder's targets, when written with their inputs (`jaxsae synth transcoder`,
`jaxsae cache --target-hook`): a shard directory inside the inputs' one, published with it."""
SAFETENSORS_KEY = "activations"

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


@dataclass(frozen=True)
class ShardEntry:
    file: str
    n_tokens: int


@dataclass(frozen=True)
class Manifest:
    d_in: int
    dtype: str
    shards: tuple[ShardEntry, ...]
    source: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "d_in": self.d_in,
                "dtype": self.dtype,
                "shards": [{"file": s.file, "n_tokens": s.n_tokens} for s in self.shards],
                "source": dict(self.source),
            },
            indent=1,
        )


def is_shard_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data directory does not exist")
    file = path / MANIFEST
    if not file.is_file():
        raise DataError(f"{path}: no {MANIFEST} (not a jaxsae shard directory)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None

    def need(ok: bool, what: str):
        if not ok:
            raise DataError(f"{file}: {what}")

    need(isinstance(raw, dict), "expected a JSON object")
    need(raw.get("format") == FORMAT, f"'format' must be {FORMAT!r}, got {raw.get('format')!r}")
    need(raw.get("version") == VERSION, f"unsupported 'version' {raw.get('version')!r}")
    d_in = raw.get("d_in")
    need(is_positive_int(d_in), f"'d_in' must be a positive integer, got {d_in!r}")
    dtype = raw.get("dtype")
    need(dtype in DTYPES, f"'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shards = raw.get("shards")
    need(isinstance(shards, list) and shards, "'shards' must be a non-empty list")
    entries, seen = [], set()
    for i, s in enumerate(shards):
        ok = isinstance(s, dict) and isinstance(s.get("file"), str)
        ok = ok and is_positive_int(s.get("n_tokens"))
        need(ok, f"shards[{i}] must be {{'file': str, 'n_tokens': positive int}}, got {s!r}")
        need("/" not in s["file"] and s["file"] not in (".", ".."),
             f"shards[{i}].file must be a file name in the directory, got {s['file']!r}")
        need(s["file"] not in seen, f"shards[{i}].file {s['file']!r} is listed twice (its "
             "tokens would be read twice)")
        seen.add(s["file"])
        entries.append(ShardEntry(s["file"], s["n_tokens"]))
    source = raw.get("source") or {}
    need(isinstance(source, dict), "'source' must be an object")
    return Manifest(d_in=d_in, dtype=dtype, shards=tuple(entries), source=source)


def _open_npy(file: Path, entry: ShardEntry, manifest: Manifest) -> np.ndarray:
    with open(file, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except (ValueError, SyntaxError, TypeError, tokenize.TokenError) as e:
            # (a damaged header's dict fails numpy's literal parse in any of these ways)
            raise DataError(f"{file}: not a valid .npy file ({e})") from None
        offset = f.tell()
    return _map(file, offset, shape, dtype, fortran, entry, manifest)


def _open_safetensors(file: Path, entry: ShardEntry, manifest: Manifest) -> np.ndarray:
    header, data_start = tensorfile.read_header(file)
    others = sorted(k for k in header if k not in (SAFETENSORS_KEY, "__metadata__"))
    if others:  # (fault testing: "N bytes after its array", which is not what is wrong)
        raise DataError(f"{file}: holds tensors other than {SAFETENSORS_KEY!r} "
                        f"({', '.join(map(repr, others[:3]))}); a shard holds one")
    offset, shape, dtype = tensorfile.tensor_layout(file, header, SAFETENSORS_KEY, data_start)
    return _map(file, offset, shape, dtype, False, entry, manifest)


def _map(file, offset, shape, dtype, fortran, entry, manifest) -> np.ndarray:
    expected_shape = (entry.n_tokens, manifest.d_in)
    if tuple(shape) != expected_shape:
        raise DataError(
            f"{file}: shape {list(shape)} does not match the manifest "
            f"[n_tokens={entry.n_tokens}, d_in={manifest.d_in}]"
        )
    if np.dtype(dtype).byteorder == ">":
        raise DataError(f"{file}: big-endian {np.dtype(dtype).newbyteorder('=').name}; shards "
                        "are little-endian (numpy's default)")
    if np.dtype(dtype) != DTYPES[manifest.dtype]:
        # (fault testing: a bfloat16 array np.save'd read "dtype void16", unexplained)
        raw = (" (raw 2-byte values: what numpy writes for bfloat16, which .npy cannot hold; "
               "write bfloat16 shards as .safetensors)"
               if np.dtype(dtype).kind == "V" and np.dtype(dtype).itemsize == 2 else "")
        raise DataError(f"{file}: dtype {np.dtype(dtype).name} but the manifest says "
                        f"{manifest.dtype}{raw}")
    if fortran:
        raise DataError(f"{file}: Fortran-ordered arrays are not supported")
    # (math.prod: fault testing found np.prod's int64 wrap a header's [2^62, 16] to 0 bytes,
    # and numpy's memmap then failed in a traceback)
    need = offset + math.prod(shape) * np.dtype(dtype).itemsize
    have = file.stat().st_size
    if have < need:
        rows = max(0, (have - offset) // (manifest.d_in * np.dtype(dtype).itemsize))
        raise DataError(
            f"{file}: truncated: {have} bytes, expected {need} "
            f"(only the first {rows} of its {entry.n_tokens} rows are present)"
        )
    if have > need:  # (what writes a shard ends the file with its array)
        raise DataError(f"{file}: {have - need} bytes after its {list(shape)} array ({have} "
                        f"bytes, expected {need}); damaged, or not the shard {MANIFEST} lists")
    # Mapped through Arrow, whose mapping outlives the file's descriptor (closed here):
    # np.memmap keeps a descriptor open per shard (Python's mmap holds a duplicate), and a
    # directory of more shards than `ulimit -n` allows (1,024 by default) failed with "Too
    # many open files", naming nothing (fault testing: 2,500 shards).
    with pa.memory_map(str(file), "r") as mapped:
        mapped.seek(offset)
        values = mapped.read_buffer(need - offset)
    return np.frombuffer(values, dtype=dtype).reshape(shape)


class ShardSet(ArraySource):
    """A validated, memory-mapped shard directory; tokens are addressed by a global index."""

    def __init__(self, path: str | Path, *, check_finite: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        arrays = []
        for entry in self.manifest.shards:
            file = self.path / entry.file
            if not file.is_file():
                raise DataError(f"{file}: listed in {MANIFEST} but "
                                f"{'not a file' if file.exists() else 'missing'}")
            if entry.file.endswith(".npy"):
                arrays.append(_open_npy(file, entry, self.manifest))
            elif entry.file.endswith(".safetensors"):
                arrays.append(_open_safetensors(file, entry, self.manifest))
            else:
                raise DataError(f"{file}: unknown shard type (expected .npy or .safetensors)")
        refuse_links([self.path / e.file for e in self.manifest.shards])
        names = [str(self.path / e.file) for e in self.manifest.shards]
        super().__init__(arrays, names, self.manifest.d_in)
        if check_finite:
            self.check_finite()


# ---------------------------------------------------------------------------------------------
# Writing


PROGRESS = "progress.json"


class ShardWriter:
    """Writes arrays [n, d_in] into fixed-size shards; `close()` publishes the directory.

    The set is written into `<out>.partial/` and renamed to `<out>/` after the manifest, so an
    interrupted write never leaves something that looks like a complete set.

    With `resume_key` (a JSON-able description of what is being written), the staging directory
    survives an interruption: every complete shard is recorded in `<out>.partial/progress.json`,
    and a later writer with the same key starts with those shards (`n_tokens` tells the caller
    where to continue). Tokens not yet in a complete shard are written again.
    """

    def __init__(
        self,
        out: str | Path,
        d_in: int,
        *,
        dtype: str = "float32",
        shard_tokens: int = 65536,
        source: Mapping[str, Any] | None = None,
        file_type: str = "npy",
        overwrite: bool = False,
        resume_key: Mapping[str, Any] | None = None,
        inputs: Sequence[str | Path] = (),
    ):
        if dtype not in DTYPES:
            raise DataError(f"shard dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if file_type not in ("npy", "safetensors"):
            raise DataError(f"shard file type must be npy or safetensors, got {file_type!r}")
        if file_type == "npy" and dtype == "bfloat16":
            raise DataError("bfloat16 shards must be written as safetensors (.npy has no bfloat16)")
        # (numpy integers too, e.g. an array's shape[1] after arithmetic: they were refused)
        d_in, shard_tokens = python_value(d_in), python_value(shard_tokens)
        for name, value in (("d_in", d_in), ("shard_tokens", shard_tokens)):
            if not is_positive_int(value):  # (fault testing: shard_tokens 0 wrote for ever)
                raise DataError(f"shard {name} must be a positive integer, got {value!r}")
        self.out = outputs.canonical(out)  # (`..` resolved: see outputs.canonical)
        self.overwrite = overwrite
        outputs.remove_stale_staging(self.out)  # (a killed writer's set-aside output: back)
        if (self.out.exists() or self.out.is_symlink()) and not overwrite:
            raise DataError(f"{self.out}: already exists (choose another --out, or pass "
                            "--overwrite to replace it)")
        self.inputs = tuple(inputs)  # what the writing reads: never replaced (check_target)
        outputs.check_target(self.out, "shards", overwrite=overwrite, inputs=self.inputs)
        self.staging = outputs.partial_path(self.out)
        self.d_in, self.dtype, self.file_type = d_in, dtype, file_type
        self.shard_tokens = shard_tokens
        self.source = dict(source or {})
        self.resume_key = None if resume_key is None else json.loads(json.dumps(resume_key))
        self._lock = self._lock_staging()
        self.entries: list[ShardEntry] = self._resumed_entries()
        if not self.entries:
            self._clear_staging()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.extra_files: list[str] = []
        self._done: Path | BaseException | None = None
        """What `close` gave: the published directory, or the error that discarded the write
        (None: still open)."""

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def _discard(self) -> None:
        """A failed writer's staging directory goes, unless it is kept to resume from (and
        holds something to resume from: not just its lock)."""
        # (the lock is still held, so nobody else writes there meanwhile)
        if self.staging.is_dir() and (self.resume_key is None
                                      or outputs.holds_only_a_lock(self.staging)):
            shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.release()

    _OURS = re.compile(r"shard-\d+\.(npy|safetensors)|truth\.(json|safetensors)|"
                       rf"{TARGET_DIR}(\.partial)?|{re.escape(PROGRESS)}(\.tmp)?|"
                       rf"{re.escape(MANIFEST)}|{re.escape(LOCK_FILE)}")

    def _lock_staging(self) -> RunLock:
        """The staging directory's lock (`outputs.lock_staging`): a directory holding only
        the files a shard writer writes is an interrupted one."""
        def ours(staging: Path) -> bool:
            return all(self._OURS.fullmatch(p.name) for p in staging.iterdir())

        return outputs.lock_staging(self.staging, ours, "shard write", self.out.name,
                                    error=DataError)

    def _clear_staging(self) -> None:
        """Removes what an earlier writer left in the staging directory (checked to be only
        that by `_lock_staging`), its lock apart."""
        outputs.empty_but_lock(self.staging)

    def _resumed_entries(self) -> list[ShardEntry]:
        """The complete shards of an interrupted write with the same resume key, if any."""
        if self.resume_key is None or not (self.staging / PROGRESS).is_file():
            return []
        try:
            progress = json.loads((self.staging / PROGRESS).read_text())
            same = (progress.get("key") == self.resume_key and progress.get("d_in") == self.d_in
                    and progress.get("dtype") == self.dtype
                    and progress.get("shard_tokens") == self.shard_tokens)
            entries = [ShardEntry(e["file"], e["n_tokens"]) for e in progress["shards"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return []
        if not same or not all((self.staging / e.file).is_file() for e in entries):
            return []
        return entries

    def _record_progress(self) -> None:
        tmp = self.staging / (PROGRESS + ".tmp")
        outputs.write_file(tmp, json.dumps({
            "key": self.resume_key, "d_in": self.d_in, "dtype": self.dtype,
            "shard_tokens": self.shard_tokens,
            "shards": [{"file": e.file, "n_tokens": e.n_tokens} for e in self.entries]}))
        os.replace(tmp, self.staging / PROGRESS)

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.entries) + self._pending_tokens

    def write(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if self._done is not None:  # (fault testing: rows written after close were lost)
            raise DataError(f"{self.out}: this write is closed; start a new one")
        if array.ndim != 2 or array.shape[1] != self.d_in:
            raise DataError(f"expected activations [n, {self.d_in}], got {list(array.shape)}")
        self._pending.append(array)
        self._pending_tokens += len(array)
        while self._pending_tokens >= self.shard_tokens:
            block = np.concatenate(self._pending)
            self._flush(block[: self.shard_tokens])
            rest = block[self.shard_tokens :]
            self._pending, self._pending_tokens = ([rest] if len(rest) else []), len(rest)

    def _flush(self, block: np.ndarray) -> None:
        name = f"shard-{len(self.entries):05d}.{self.file_type}"
        with np.errstate(over="ignore"):  # (refused just below, in one line)
            data = np.ascontiguousarray(block.astype(DTYPES[self.dtype]))
        # Values written as given, a NaN included (readers find it: data.check_finite, data
        # inspect), but none turned into inf by the cast.
        if self.dtype != "float32" and np.isinf(data).sum() > np.isinf(block).sum():
            limit = float(np.finfo(DTYPES[self.dtype]).max)
            raise DataError(f"{self.out}: activations beyond {self.dtype}'s range "
                            f"(|x| > {limit:.6g}) in what would be {name}; write them as "
                            "float32")
        try:
            if self.file_type == "npy":
                np.save(self.staging / name, data)
            else:
                tensorfile.write(self.staging / name, {SAFETENSORS_KEY: data})
        except OSError as e:
            if e.errno is not None:
                raise
            # (numpy reports a short write without errno or file: "N requested and M written")
            raise DataError(f"{self.staging / name}: a short write ({e}): the file system is "
                            "full or failing") from None
        self.entries.append(ShardEntry(name, len(block)))
        if self.resume_key is not None:
            self._record_progress()

    def close(self) -> Path:
        """Publishes the directory; if that fails, the write is discarded (its staging and
        lock released: fault testing found a failed close holding them until the process
        ended) and the error raised. Closing again returns the directory, or refuses."""
        if isinstance(self._done, Path):
            return self._done
        if self._done is not None:
            raise DataError(f"{self.out}: this write failed ({self._done}); start a new one")
        try:
            self._done = self._publish()
        except BaseException as e:
            self._done = e
            self._discard()
            raise
        return self._done

    def _publish(self) -> Path:
        if self._pending_tokens:
            self._flush(np.concatenate(self._pending))
            self._pending, self._pending_tokens = [], 0
        if not self.entries:
            raise DataError(f"{self.out}: no activations were written")
        manifest = Manifest(self.d_in, self.dtype, tuple(self.entries), self.source)
        (self.staging / PROGRESS).unlink(missing_ok=True)
        outputs.write_file(self.staging / MANIFEST, manifest.to_json())
        outputs.check_target(self.out, "shards", overwrite=self.overwrite, inputs=self.inputs)
        interrupts.check_terminated()
        outputs.move_locked_staging(self.staging, self.out)
        self._lock.release()
        return self.out
