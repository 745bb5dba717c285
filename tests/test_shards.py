"""The shard format: ShardWriter -> ShardSet round trips, validation errors, and tensorfile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxsae import tensorfile
from jaxsae.config import DataConfig
from jaxsae.data import open_source
from jaxsae.data.shards import MANIFEST, SAFETENSORS_KEY, ShardSet, ShardWriter
from jaxsae.data.source import iter_blocks
from jaxsae.errors import DataError

D_IN = 3
SHARD_TOKENS = 7
WRITE_SIZES = (5, 11, 3, 9, 2)  # 30 tokens: shards of 7, 7, 7, 7 and 2
N_TOKENS = sum(WRITE_SIZES)


def source_data(n: int = N_TOKENS, d: int = D_IN, seed: int = 0) -> np.ndarray:
    """Distinct values per token (row i starts with i) plus noise, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x


def write_set(out: Path, data: np.ndarray, *, dtype="float32", file_type="npy",
              sizes=WRITE_SIZES, shard_tokens=SHARD_TOKENS, **kwargs) -> Path:
    with ShardWriter(out, data.shape[1], dtype=dtype, file_type=file_type,
                     shard_tokens=shard_tokens, **kwargs) as writer:
        lo = 0
        for size in sizes:
            writer.write(data[lo : lo + size])
            lo += size
        assert lo == len(data)
    return out


def rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# Round trips

ROUND_TRIPS = [
    ("npy", "float32", np.float32),
    ("npy", "float16", np.float16),
    ("safetensors", "float32", np.float32),
    ("safetensors", "bfloat16", ml_dtypes.bfloat16),
]


@pytest.mark.parametrize(("file_type", "dtype", "np_dtype"), ROUND_TRIPS)
def test_round_trip(tmp_path, file_type, dtype, np_dtype):
    data = source_data()
    source = {"model": "tiny", "layer": 3}
    out = write_set(tmp_path / "set", data, dtype=dtype, file_type=file_type, source=source)

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "jaxsae.shards"
    assert manifest["version"] == 1
    assert manifest["d_in"] == D_IN
    assert manifest["dtype"] == dtype
    assert manifest["source"] == source
    assert [s["n_tokens"] for s in manifest["shards"]] == [7, 7, 7, 7, 2]
    files = [s["file"] for s in manifest["shards"]]
    assert all(f.endswith("." + file_type) for f in files)
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, MANIFEST])
    assert not (tmp_path / "set.partial").exists()

    # Each file holds the stored dtype (not silently float32).
    first = out / files[0]
    stored = (np.load(first) if file_type == "npy"
              else tensorfile.read(first)[SAFETENSORS_KEY])
    assert stored.dtype == np.dtype(np_dtype)
    assert stored.shape == (7, D_IN)

    shards = ShardSet(out, check_finite=True)
    assert shards.d_in == D_IN
    assert shards.n_tokens == N_TOKENS
    expected = data.astype(np_dtype).astype(np.float32)
    full = shards.read(0, N_TOKENS)
    assert full.dtype == np.float32
    assert full.shape == (N_TOKENS, D_IN)
    np.testing.assert_array_equal(full, expected)
    # The token index survives every dtype exactly (small integers), so order is checked too.
    np.testing.assert_array_equal(full[:, 0], np.arange(N_TOKENS))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_a_directory_of_more_shards_than_open_files_allowed_reads(tmp_path):
    """(fault testing: every memory-mapped shard held a file descriptor open, so a directory
    of 2,500 shards under the default `ulimit -n` of 1,024 failed with "Too many open files",
    naming nothing.) The shards stay mapped, and readable, with their files closed."""
    import resource

    data = source_data(64)
    out = write_set(tmp_path / "set", data, sizes=(64,), shard_tokens=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 16, hard))
    try:
        shards = ShardSet(out)
        np.testing.assert_array_equal(shards.read(0, 64), data)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(os.listdir("/proc/self/fd")) < open_now + 16


def test_read_every_range_across_shard_boundaries(tmp_path):
    data = source_data()
    shards = ShardSet(write_set(tmp_path / "set", data))
    for start in range(N_TOKENS):
        for stop in range(start + 1, N_TOKENS + 1):
            got = shards.read(start, stop)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, data[start:stop], err_msg=f"[{start}, {stop})")


@pytest.mark.parametrize(("start", "stop"), [(-1, 3), (0, N_TOKENS + 1), (5, 4)])
def test_read_out_of_range(tmp_path, start, stop):
    shards = ShardSet(write_set(tmp_path / "set", source_data()))
    with pytest.raises(IndexError):
        shards.read(start, stop)


@pytest.mark.parametrize("at", [0, SHARD_TOKENS, N_TOKENS])
def test_read_empty_range(tmp_path, at):
    shards = ShardSet(write_set(tmp_path / "set", source_data()))
    got = shards.read(at, at)
    assert got.shape == (0, D_IN)
    assert got.dtype == np.float32


def test_iter_blocks(tmp_path):
    data = source_data()
    shards = ShardSet(write_set(tmp_path / "set", data))
    blocks = list(iter_blocks(shards, 4, start=3, stop=26))
    assert [len(b) for b in blocks] == [4, 4, 4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(blocks), data[3:26])


def test_open_source(tmp_path, small_data):
    shards = open_source(DataConfig(path=str(small_data), check_finite=True))
    assert isinstance(shards, ShardSet)
    assert shards.n_tokens == 16384 and shards.d_in == 16
    with pytest.raises(DataError, match="does not exist"):
        open_source(DataConfig(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"manifest\.json"):
        open_source(DataConfig(path=str(tmp_path / "empty")))


# ---------------------------------------------------------------------------------------------
# The writer's staging and overwrite behaviour


def test_writer_stages_into_partial(tmp_path):
    out = tmp_path / "set"
    writer = ShardWriter(out, D_IN, shard_tokens=4)
    assert writer.staging == tmp_path / "set.partial"
    writer.write(source_data(10))
    assert writer.n_tokens == 10
    assert writer.staging.is_dir()
    assert not out.exists()
    assert not (writer.staging / MANIFEST).exists()
    assert writer.close() == out
    assert out.is_dir() and (out / MANIFEST).is_file()
    assert not writer.staging.exists()


def test_writer_refuses_existing_out_unless_overwrite(tmp_path):
    out = write_set(tmp_path / "set", source_data())  # 5 shards
    with pytest.raises(DataError, match="already exists") as err:
        ShardWriter(out, D_IN)
    assert str(out) in str(err.value)
    assert not (tmp_path / "set.partial").exists()

    new = source_data(12, seed=1)
    write_set(out, new, sizes=(12,), overwrite=True)  # 2 shards: no stale files may remain
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-00000.npy",
                                                     "shard-00001.npy"]
    np.testing.assert_array_equal(ShardSet(out).read(0, 12), new)
    assert not (tmp_path / "set.partial").exists()


def test_a_writer_whose_close_fails_lets_go_and_bad_sizes_are_refused(tmp_path):
    """(fault testing, library use: a failed close() held the output's lock until the process
    ended, and a second close() was a FileNotFoundError; shard_tokens 0 wrote for ever)"""
    out = tmp_path / "set"
    empty = ShardWriter(out, D_IN)
    with pytest.raises(DataError, match="no activations were written"):
        empty.close()
    with pytest.raises(DataError, match=r"set: this write failed \(.*no activations.*\); start "
                                        r"a new one"):
        empty.close()
    assert list(tmp_path.iterdir()) == []  # staging and lock gone
    writer = ShardWriter(out, D_IN, shard_tokens=4)  # the output is free again
    writer.write(source_data(6))
    assert writer.close() == out and writer.close() == out  # closing twice: the same set
    with pytest.raises(DataError, match=r"set: this write is closed; start a new one"):
        writer.write(source_data(3))
    np.testing.assert_array_equal(ShardSet(out).read(0, 6), source_data(6))
    for bad in ({"shard_tokens": 0}, {"shard_tokens": -1}, {"d_in": 0}):
        name, value = next(iter(bad.items()))
        kwargs = {"d_in": D_IN, **bad}
        with pytest.raises(DataError, match=f"shard {name} must be a positive integer, got "
                                            f"{value}"):
            ShardWriter(tmp_path / "other", kwargs.pop("d_in"), **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    # numpy integers are integers (an array's shape after arithmetic was refused)
    x = source_data(6)
    with ShardWriter(tmp_path / "numpy", np.int64(x.shape[1]), shard_tokens=np.int32(4)) as w:
        w.write(x)
    assert [s.n_tokens for s in ShardSet(tmp_path / "numpy").manifest.shards] == [4, 2]
    np.testing.assert_array_equal(ShardSet(tmp_path / "numpy").read(0, 6), x)


def test_exception_inside_with_leaves_nothing(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(out, D_IN, shard_tokens=4) as w:
        w.write(source_data(10))  # two shards already flushed to the staging dir
        raise RuntimeError("boom")
    assert not out.exists()
    assert not (tmp_path / "set.partial").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_of_the_same_output_is_refused_while_the_first_writes(tmp_path):
    """(fault testing: two `synth --out S` at once shared S.partial: the second cleared the
    first's shards, and the first published a set mixing both, its manifest naming one)"""
    out = tmp_path / "set"
    first = ShardWriter(out, D_IN, shard_tokens=4)
    first.write(source_data(10))
    for resume_key in (None, {"kind": "other"}):
        # (the first writer is this process's: said so, not "another process, pid <ours>")
        with pytest.raises(DataError, match=rf"{tmp_path / 'set.partial'}: this process is "
                                            r"already writing set here \(one not finished or "
                                            r"closed"):
            ShardWriter(out, D_IN, shard_tokens=4, resume_key=resume_key)
    first.close()
    np.testing.assert_array_equal(ShardSet(out).read(0, 10), source_data(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # (the lock went with it)
    assert ".lock" not in os.listdir(out)
    # a killed writer's staging (its lock free) is cleared, or resumed, by the next one
    stale = ShardWriter(tmp_path / "again", D_IN, shard_tokens=4)
    stale.write(source_data(10))
    stale._lock.release()  # as the end of its process would
    write_set(tmp_path / "again", source_data(6, seed=2), sizes=(6,))
    np.testing.assert_array_equal(ShardSet(tmp_path / "again").read(0, 6), source_data(6, seed=2))


def test_writer_argument_errors(tmp_path):
    with pytest.raises(DataError, match="bfloat16"):
        ShardWriter(tmp_path / "a", D_IN, dtype="bfloat16", file_type="npy")
    with pytest.raises(DataError, match="dtype"):
        ShardWriter(tmp_path / "b", D_IN, dtype="int8")
    with pytest.raises(DataError, match="file type"):
        ShardWriter(tmp_path / "c", D_IN, file_type="parquet")
    writer = ShardWriter(tmp_path / "d", D_IN)
    with pytest.raises(DataError, match=r"\[n, 3\]"):
        writer.write(np.zeros((4, D_IN + 1), np.float32))
    with pytest.raises(DataError, match="no activations"):
        writer.close()
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------
# Validation: every error is a DataError that names the offending file


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        ShardSet(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_no_manifest(tmp_path):
    (tmp_path / "set").mkdir()
    np.save(tmp_path / "set" / "shard-00000.npy", source_data())
    with pytest.raises(DataError, match=r"no manifest\.json") as err:
        ShardSet(tmp_path / "set")
    assert str(tmp_path / "set") in str(err.value)


def test_manifest_not_json(tmp_path):
    out = write_set(tmp_path / "set", source_data())
    (out / MANIFEST).write_text('{"format": "jaxsae.shards", ')
    with pytest.raises(DataError, match="not valid JSON") as err:
        ShardSet(out)
    assert str(out / MANIFEST) in str(err.value)


@pytest.mark.parametrize(("changes", "what"), [
    ({"format": "numpy"}, "'format'"),
    ({"version": 2}, "'version'"),
    ({"d_in": 0}, "'d_in'"),
    ({"dtype": "int8"}, "'dtype'"),
    ({"shards": []}, "'shards'"),
    ({"shards": [{"file": "../x.npy", "n_tokens": 7}]}, "shards\\[0\\].file"),
    ({"shards": [{"file": "shard-00000.npy", "n_tokens": 0}]}, "shards\\[0\\]"),
    ({"d_in": True}, "'d_in' must be a positive integer, got True"),  # (bool passed as int)
    ({"shards": [{"file": "shard-00000.npy", "n_tokens": 7}] * 2},
     "shards\\[1\\].file 'shard-00000.npy' is listed twice"),
])
def test_manifest_fields(tmp_path, changes, what):
    out = write_set(tmp_path / "set", source_data())
    rewrite_manifest(out, **changes)
    with pytest.raises(DataError, match=what) as err:
        ShardSet(out)
    assert str(out / MANIFEST) in str(err.value)


def test_shard_listed_but_missing(tmp_path):
    out = write_set(tmp_path / "set", source_data())
    (out / "shard-00002.npy").unlink()
    with pytest.raises(DataError, match="missing") as err:
        ShardSet(out)
    assert str(out / "shard-00002.npy") in str(err.value)
    (out / "shard-00002.npy").mkdir()
    with pytest.raises(DataError, match=r"shard-00002\.npy: listed in manifest\.json but "
                                        r"not a file"):
        ShardSet(out)


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_two_names_of_one_shard_are_refused(tmp_path, link):
    """A shard that is a link to another would be read twice (fault testing: the held-out
    tokens were training tokens again)."""
    out = write_set(tmp_path / "set", source_data())
    (out / "shard-00001.npy").unlink()
    link("shard-00000.npy" if link is os.symlink else out / "shard-00000.npy",
         out / "shard-00001.npy")
    with pytest.raises(DataError, match=r"shard-00001\.npy: the same file as .*shard-00000"
                                        r"\.npy \(a link; its tokens would be read twice\)"):
        ShardSet(out)


@pytest.mark.parametrize("file_type", ["npy", "safetensors"])
def test_manifest_lies_about_n_tokens(tmp_path, file_type):
    out = write_set(tmp_path / "set", source_data(), file_type=file_type)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"][1]["n_tokens"] = 8  # the file holds 7
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="does not match the manifest") as err:
        ShardSet(out)
    assert str(out / f"shard-00001.{file_type}") in str(err.value)
    assert "[7, 3]" in str(err.value)


def test_d_in_mismatch(tmp_path):
    out = write_set(tmp_path / "set", source_data())
    rewrite_manifest(out, d_in=D_IN + 1)
    with pytest.raises(DataError, match="d_in=4") as err:
        ShardSet(out)
    assert str(out / "shard-00000.npy") in str(err.value)


@pytest.mark.parametrize(("file_type", "stored", "claimed"), [
    ("npy", "float32", "float16"),
    ("npy", "float16", "float32"),
    ("safetensors", "bfloat16", "float16"),
    ("safetensors", "float32", "bfloat16"),
])
def test_dtype_mismatch(tmp_path, file_type, stored, claimed):
    out = write_set(tmp_path / "set", source_data(), dtype=stored, file_type=file_type)
    rewrite_manifest(out, dtype=claimed)
    with pytest.raises(DataError, match=f"dtype {stored} but the manifest says {claimed}") as err:
        ShardSet(out)
    assert str(out / f"shard-00000.{file_type}") in str(err.value)


def test_a_bfloat16_npy_shard_is_named_as_such(tmp_path):
    """(fault testing: a bfloat16 array saved with np.save, which .npy stores as raw 2-byte
    values, was refused as "dtype void16 but the manifest says bfloat16", unexplained.) The
    refusal says what the file holds and how to write bfloat16 shards."""
    out = write_set(tmp_path / "set", source_data())
    np.save(out / "shard-00000.npy", np.load(out / "shard-00000.npy").astype(ml_dtypes.bfloat16))
    rewrite_manifest(out, dtype="bfloat16")
    with pytest.raises(DataError, match=r"shard-00000\.npy: dtype void16 but the manifest says "
                                        r"bfloat16 \(raw 2-byte values: what numpy writes for "
                                        r"bfloat16.*as \.safetensors\)"):
        ShardSet(out)


@pytest.mark.parametrize("file_type", ["npy", "safetensors"])
@pytest.mark.parametrize("cut", [1, 4 * D_IN + 1])  # a partial last row; more than one row
def test_truncated_data(tmp_path, file_type, cut):
    out = write_set(tmp_path / "set", source_data(), file_type=file_type)
    file = out / f"shard-00003.{file_type}"
    os.truncate(file, file.stat().st_size - cut)
    with pytest.raises(DataError, match="truncated") as err:
        ShardSet(out)
    assert str(file) in str(err.value)


def test_a_header_whose_size_overflows_int64_is_truncated_not_a_traceback(tmp_path):
    """(fault testing: a .npy header and manifest claiming 2^62 rows of 16 values, 2^68
    bytes, wrapped to 0 bytes in numpy's int64 product and ended in numpy's "array is too
    big" traceback.) The shard is named, truncated."""
    out = tmp_path / "set"
    out.mkdir()
    rows = 2**62
    with open(out / "shard-00000.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 16)})
    (out / MANIFEST).write_text(json.dumps({
        "format": "jaxsae.shards", "version": 1, "d_in": 16, "dtype": "float32",
        "shards": [{"file": "shard-00000.npy", "n_tokens": rows}]}))
    with pytest.raises(DataError, match=r"shard-00000\.npy: truncated: .*\(only the first 0 "):
        ShardSet(out)


@pytest.mark.parametrize("file_type", ["npy", "safetensors"])
def test_bytes_after_the_array(tmp_path, file_type):
    """(fault testing: a shard grown past its array, e.g. two writers' bytes in one file, was
    read as if whole)"""
    out = write_set(tmp_path / "set", source_data(), file_type=file_type)
    file = out / f"shard-00002.{file_type}"
    with open(file, "ab") as f:
        f.write(b"\0" * 12)
    with pytest.raises(DataError, match="12 bytes after its") as err:
        ShardSet(out)
    assert str(file) in str(err.value)


def test_a_big_endian_shard_or_a_second_tensor_is_named_as_such(tmp_path):
    """(fault testing: a big-endian .npy read "dtype float32 but the manifest says float32",
    a safetensors shard with a second tensor "192 bytes after its array")"""
    out = write_set(tmp_path / "set", source_data())
    file = out / "shard-00000.npy"
    np.save(file, np.load(file).astype(">f4"))
    with pytest.raises(DataError, match=r"shard-00000\.npy: big-endian float32"):
        ShardSet(out)
    out = write_set(tmp_path / "st", source_data(), file_type="safetensors")
    file = out / "shard-00001.safetensors"
    tensors = dict(tensorfile.read(file))
    tensorfile.write(file, {**{k: np.asarray(v) for k, v in tensors.items()},
                            "extra": np.zeros(3, np.float32)})
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: holds tensors other than "
                                        r"'activations' \('extra'\)"):
        ShardSet(out)


@pytest.mark.parametrize(("file_type", "size"), [
    ("npy", 3),             # inside the magic string
    ("npy", 20),            # inside the header
    ("safetensors", 5),     # inside the 8-byte header length
    ("safetensors", 30),    # inside the JSON header
])
def test_truncated_header(tmp_path, file_type, size):
    out = write_set(tmp_path / "set", source_data(), file_type=file_type)
    file = out / f"shard-00001.{file_type}"
    os.truncate(file, size)
    with pytest.raises(DataError) as err:
        ShardSet(out)
    assert str(file) in str(err.value)


def test_unknown_shard_type(tmp_path):
    out = write_set(tmp_path / "set", source_data())
    os.replace(out / "shard-00000.npy", out / "shard-00000.bin")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"][0]["file"] = "shard-00000.bin"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="unknown shard type") as err:
        ShardSet(out)
    assert str(out / "shard-00000.bin") in str(err.value)


def test_safetensors_shard_without_activations_tensor(tmp_path):
    out = write_set(tmp_path / "set", source_data(), file_type="safetensors")
    file = out / "shard-00000.safetensors"
    tensorfile.write(file, {"acts": source_data(7)})
    with pytest.raises(DataError, match="'activations'") as err:
        ShardSet(out)
    assert str(file) in str(err.value)


@pytest.mark.parametrize(("file_type", "dtype", "bad"), [
    ("npy", "float32", np.nan),
    ("npy", "float16", np.inf),
    ("safetensors", "bfloat16", -np.inf),
])
def test_non_finite(tmp_path, file_type, dtype, bad):
    data = source_data()
    data[16, 2] = bad  # shard 2, local row 2
    data[18, 1] = bad  # shard 2, local row 4
    out = write_set(tmp_path / "set", data, dtype=dtype, file_type=file_type)

    shards = ShardSet(out)  # not checked by default: opens, and reads the values as they are
    assert not np.isfinite(shards.read(14, 21)).all()

    with pytest.raises(DataError, match="non-finite") as err:
        ShardSet(out, check_finite=True)
    message = str(err.value)
    assert str(out / f"shard-00002.{file_type}") in message
    assert "rows 2..4" in message


def test_non_finite_found_in_later_block(tmp_path):
    data = source_data()
    data[26, 0] = np.nan  # shard 3, local row 5: in the second block of 4 rows
    shards = ShardSet(write_set(tmp_path / "set", data))
    with pytest.raises(DataError, match=r"values in row 5$") as err:
        shards.check_finite(rows_per_read=4)
    assert "shard-00003.npy" in str(err.value)


# ---------------------------------------------------------------------------------------------
# tensorfile


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal((3,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3, 2)).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal((5,)),
        "i32": np.arange(-3, 4, dtype=np.int32),
        "i64": np.array([[2**40, -1]], dtype=np.int64),
        "odd": rng.standard_normal((3, 1)).astype(np.float16),  # 6 bytes: next one unaligned
        "after_odd": rng.standard_normal((2, 2)).astype(np.float32),
    }


def test_tensorfile_round_trip(tmp_path):
    file = tmp_path / "t.safetensors"
    original = tensors()
    tensorfile.write(file, original, metadata={"format": "pt", "note": "hi"})
    loaded = tensorfile.read(file)
    assert set(loaded) == set(original)
    for name, array in original.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(np.asarray(loaded[name]), array, err_msg=name)
    header, start = tensorfile.read_header(file)
    assert header["__metadata__"] == {"format": "pt", "note": "hi"}
    assert start % 8 == 0
    assert header["bf16"]["dtype"] == "BF16"


def test_tensorfile_interoperates_with_safetensors(tmp_path):
    plain = {k: v for k, v in tensors().items() if k != "bf16"}  # safetensors.numpy: no bf16
    tensorfile.write(tmp_path / "ours.safetensors", plain)
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    for name, array in plain.items():
        np.testing.assert_array_equal(theirs[name], array, err_msg=name)

    safetensors.numpy.save_file(plain, tmp_path / "theirs.safetensors")
    ours = tensorfile.read(tmp_path / "theirs.safetensors")
    for name, array in plain.items():
        assert ours[name].dtype == array.dtype
        np.testing.assert_array_equal(np.asarray(ours[name]), array, err_msg=name)


def test_tensorfile_scalar_round_trip(tmp_path):
    tensorfile.write(tmp_path / "s.safetensors", {"s": np.array(2.5, np.float32)})
    loaded = tensorfile.read(tmp_path / "s.safetensors")
    assert loaded["s"].shape == ()
    assert float(loaded["s"]) == 2.5


def test_tensorfile_errors(tmp_path):
    with pytest.raises(ValueError, match="u8"):
        tensorfile.write(tmp_path / "u.safetensors", {"u8": np.zeros(3, np.uint8)})
    file = tmp_path / "t.safetensors"
    tensorfile.write(file, {"a": np.zeros((4, 4), np.float32)})
    os.truncate(file, file.stat().st_size - 4)
    with pytest.raises(DataError, match="truncated") as err:
        tensorfile.read(file)
    assert str(file) in str(err.value)


def edit_header(file: Path, name: str, entry: object = None, **changes) -> None:
    """Rewrites tensor `name`'s header entry as `entry`, or with `changes` (a key given None
    is dropped), the data kept."""
    header, start = tensorfile.read_header(file)
    data = file.read_bytes()[start:]
    header[name] = entry if entry is not None else {
        k: v for k, v in {**header[name], **changes}.items() if v is not None}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize(("changes", "message"), [
    ({"shape": "4x4"}, r"shape \"4x4\" is not a list of non-negative integers"),
    ({"shape": None}, r"shape null is not a list"),
    ({"shape": [16.0]}, r"shape \[16.0\] is not a list"),
    ({"shape": [-4, -4]}, r"shape \[-4, -4\] is not a list"),
    ({"shape": [True, 16]}, r"shape \[true, 16\] is not a list"),
    ({"data_offsets": "0"}, r"data_offsets \"0\" is not a list of two integers"),
    ({"data_offsets": [0, 32, 64]}, r"data_offsets \[0, 32, 64\] is not a list of two"),
    ({"data_offsets": [False, 64]}, r"data_offsets \[false, 64\] is not a list of two"),
    ({"data_offsets": [-64, 0]}, r"data_offsets \[-64, 0\] lie outside the file's data"),
    ({"data_offsets": [64, 0]}, r"data_offsets \[64, 0\] end before they begin"),
])
def test_tensorfile_refuses_a_malformed_header_entry_naming_the_tensor(tmp_path, changes,
                                                                       message):
    """(fault testing: a shape "256x16" or null, or data_offsets "0", gave tracebacks; a shape
    16.5 was read as 16, [-16, -64] gave numpy's "negative dimensions are not allowed", and a
    negative begin read the JSON header as the tensor's values)"""
    file = tmp_path / "t.safetensors"
    tensorfile.write(file, {"a": np.ones(16, np.float32), "b": np.zeros(16, np.float32)})
    edit_header(file, "b", **changes)
    with pytest.raises(DataError, match=rf"t\.safetensors: tensor 'b': {message}"):
        tensorfile.read(file)


def test_tensorfile_refuses_a_dtype_that_is_not_a_name(tmp_path):
    """(a review: ["F32"] was a TypeError, unhashable, and a traceback)"""
    file = tmp_path / "t.safetensors"
    tensorfile.write(file, {"a": np.ones(16, np.float32)})
    edit_header(file, "a", dtype=["F32"])
    with pytest.raises(DataError, match=r"tensor 'a' has unsupported dtype \['F32'\]"):
        tensorfile.read(file)


def test_tensorfile_refuses_a_header_entry_that_is_not_an_object_or_overlapping_tensors(
        tmp_path):
    file = tmp_path / "t.safetensors"
    tensorfile.write(file, {"a": np.ones(16, np.float32), "b": np.zeros(16, np.float32)})
    header, _ = tensorfile.read_header(file)
    edit_header(file, "b", data_offsets=header["a"]["data_offsets"])
    with pytest.raises(DataError, match=r"t\.safetensors: tensors 'a' and 'b' overlap"):
        tensorfile.read(file)
    edit_header(file, "b", [header["a"]])
    with pytest.raises(DataError, match=r"tensor 'b': malformed header entry \[\{"):
        tensorfile.read(file)


def test_a_shard_whose_data_offsets_point_into_its_header_is_refused(tmp_path):
    """(fault testing: `data inspect` called such a shard valid, its first row header bytes)"""
    out = write_set(tmp_path / "set", source_data(), file_type="safetensors")
    file = out / "shard-00002.safetensors"
    begin, end = tensorfile.read_header(file)[0][SAFETENSORS_KEY]["data_offsets"]
    edit_header(file, SAFETENSORS_KEY, data_offsets=[begin - 8, end - 8])
    with pytest.raises(DataError, match=r"shard-00002\.safetensors: tensor 'activations': "
                                        r"data_offsets \[-8, \d+\] lie outside"):
        ShardSet(out)


def test_a_short_write_names_the_shard(tmp_path, monkeypatch):
    """(fault testing: a full disk under `synth` gave numpy's '80000 requested and 19424
    written', naming neither the file nor the cause)"""
    def short(*args, **kwargs):
        raise OSError("80000 requested and 19424 written")

    monkeypatch.setattr(np, "save", short)
    with pytest.raises(DataError, match=r"set\.partial/shard-00000\.npy: a short write \(80000 "
                                        r"requested and 19424 written\): the file system is full"):
        write_set(tmp_path / "set", source_data())
    assert list(tmp_path.iterdir()) == []
