"""SAELens / Hugging Face `datasets` activation caches, read memory-mapped.

A SAELens cache is a `datasets.Dataset.save_to_disk` directory: `dataset_info.json`,
`state.json` and `data-NNNNN-of-MMMMM.arrow` files (Arrow IPC streams). Each row is one
sequence; the activation column is named after the hook (e.g. `blocks.8.hook_resid_pre`) with
feature type `Array2D(shape=(context_size, d_in))`, beside a `token_ids` column. Rows are
flattened to tokens: row r, position t is token r·context_size + t. The Arrow files are
memory-mapped and the activation values are zero-copy views of them; nothing is loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jaxsae.data.source import ArraySource, refuse_links
from jaxsae.errors import DataError

INFO = "dataset_info.json"
STATE = "state.json"
_FLOAT = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def is_saelens_cache(path: str | Path) -> bool:
    path = Path(path)
    return (path / INFO).is_file() and (path / STATE).is_file()


def activation_columns(path: str | Path) -> list[str]:
    """The float Array2D columns of a SAELens cache at `path` ([] for anything else, or one
    that does not read: opening it says why)."""
    try:
        info = json.loads((Path(path) / INFO).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(info, dict):
        return []
    try:
        columns = _array2d_columns(info, Path(path) / INFO)
    except DataError:
        return []
    return [name for name, (_, dtype) in columns.items() if dtype in _FLOAT]


def _array2d_columns(info: dict, file: Path) -> dict[str, tuple[object, str]]:
    """Every Array2D column of a dataset_info.json: name -> (its shape as written, its dtype).
    A malformed file is refused naming `file` (fault testing: tracebacks); a shape is checked
    only where a column is read (`_shape`: datasets allows a variable first dimension, None,
    in a column this never reads)."""
    features = info.get("features") or {}
    if not isinstance(features, dict):
        raise DataError(f"{file}: 'features' is not a mapping of column names")
    out = {}
    for name, feature in features.items():
        if not (isinstance(feature, dict) and feature.get("_type") == "Array2D"):
            continue
        dtype = feature.get("dtype")
        if not isinstance(dtype, str):
            raise DataError(f"{file}: column {name!r} has dtype {dtype!r}, not a dtype name")
        out[name] = (feature.get("shape"), dtype)
    return out


def _shape(shape: object, name: str, file: Path) -> tuple[int, int]:
    """The [positions, d_in] of the activation column that is read."""
    if not (isinstance(shape, list) and len(shape) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise DataError(f"{file}: column {name!r} has shape {shape!r}; an activation "
                        "column's is two positive integers")
    return shape[0], shape[1]


class SAELensCache(ArraySource):
    """Tokens of one activation column of a SAELens cache."""

    def __init__(self, path: str | Path, *, hook: str | None = None,
                 key: str = "data.hook or --hook", check_finite: bool = False):
        self.path = Path(path)
        info, state = self._read_json(INFO), self._read_json(STATE)
        arrays = _array2d_columns(info, self.path / INFO)
        columns = {name: shape for name, (shape, dtype) in arrays.items() if dtype in _FLOAT}
        if not columns:
            what = "" if not arrays else " of a float dtype ({}; {} are read)".format(
                ", ".join(f"{n}: {d}" for n, (_, d) in arrays.items()), ", ".join(_FLOAT))
            raise DataError(f"{self.path / INFO}: no Array2D activation column{what}")
        if hook is None:
            if len(columns) > 1:
                raise DataError(f"{self.path}: several activation columns "
                                f"({', '.join(columns)}); choose one with {key}")
            hook = next(iter(columns))
        if hook not in columns:
            raise DataError(f"{key}: {hook!r} is not an activation column of {self.path} "
                            f"(it has {', '.join(columns)})")
        self.hook = hook
        self.context_size, d_in = _shape(columns[hook], hook, self.path / INFO)
        self.dtype = np.dtype(_FLOAT[arrays[hook][1]])
        listed = state.get("_data_files", [])
        # (fault testing: a filename that was not text, or none, was "no _data_files listed")
        if not isinstance(listed, list) or not all(
                isinstance(f, dict) and isinstance(f.get("filename"), str) for f in listed):
            raise DataError(f"{self.path / STATE}: _data_files is not a list of files "
                            "({\"filename\": ...} each)")
        files = [f["filename"] for f in listed]
        if not files:
            raise DataError(f"{self.path / STATE}: no _data_files listed")
        for i, name in enumerate(files):  # datasets lists its own files by name
            if Path(name).name != name or name in (".", ".."):
                raise DataError(f"{self.path / STATE}: _data_files lists {name!r}, not a file "
                                "name in the cache directory")
            # (fault testing: a file listed twice was read twice, and the "held-out" tokens
            # were training tokens again)
            if name in files[:i]:
                raise DataError(
                    f"{self.path / STATE}: _data_files lists {name!r} twice (its tokens would "
                    "be read twice)")
        for name in files:
            # (fault testing: a directory was "missing", and a name holding a NUL byte was
            # printed with it: names from state.json are shown with repr)
            file = self.path / name
            if not file.is_file():
                what = ("a directory, not an Arrow file" if file.is_dir()
                        else "not a regular file" if file.exists() else "which is missing")
                raise DataError(f"{self.path / STATE}: _data_files lists {name!r}, {what}")
        refuse_links([self.path / name for name in files])
        self.files = files
        """The Arrow files state.json lists, in order (what is read)."""
        arrays, names = [], []
        for name in files:
            for i, values in enumerate(self._open(self.path / name, d_in)):
                arrays.append(values)
                names.append(f"{self.path / name}" + (f" (record batch {i})" if i else ""))
        super().__init__(arrays, names, d_in)
        if self.n_tokens == 0:  # (fault testing: tracebacks from inspect, eval and analyze)
            which = "its data file has" if len(files) == 1 else f"its {len(files)} data files have"
            raise DataError(f"{self.path}: holds no tokens ({which} no rows)")
        if check_finite:
            self.check_finite()

    def _read_json(self, name: str) -> dict:
        file = self.path / name
        if not file.is_file():
            raise DataError(f"{self.path}: no {name} (not a datasets.save_to_disk directory)")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{file}: expected a JSON object")
        return raw

    def _open(self, file: Path, d_in: int) -> list[np.ndarray]:
        """[rows·context_size, d_in] views of the hook column, one per record batch."""
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(file), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{file}: not a readable Arrow stream ({e})") from None
        if self.hook not in table.column_names:
            raise DataError(f"{file}: no column {self.hook!r}")
        out = []
        for chunk in table.column(self.hook).chunks:
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            rows = len(storage)
            if rows == 0:
                continue
            try:
                for level, (size, what) in enumerate(((self.context_size, "positions"),
                                                      (d_in, "values"))):
                    lengths = _list_lengths(storage if level == 0 else storage.flatten())
                    if lengths != {size}:
                        raise DataError(
                            f"{file}: column {self.hook!r} has rows of "
                            f"{sorted(lengths)[:3]} {what} where {INFO} says [{self.context_size}"
                            f", {d_in}]")
                values = storage.flatten().flatten()
                array = values.to_numpy(zero_copy_only=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError,
                    AttributeError) as e:
                raise DataError(f"{file}: column {self.hook!r} is not a dense float array "
                                f"({e})") from None
            if array.dtype != self.dtype:
                raise DataError(f"{file}: column {self.hook!r} holds {array.dtype.name} where "
                                f"{INFO} says {self.dtype.name}")
            if array.size != rows * self.context_size * d_in:
                raise DataError(f"{file}: column {self.hook!r} has {array.size} values for "
                                f"{rows} rows of [{self.context_size}, {d_in}]")
            out.append(array.reshape(rows * self.context_size, d_in))
        return out


def _list_lengths(array: pa.Array) -> set[int]:
    """The distinct lengths of the lists of a list array (nulls aside)."""
    if pa.types.is_fixed_size_list(array.type):
        return {array.type.list_size}
    return set(pc.list_value_length(array).drop_null().unique().to_pylist())
