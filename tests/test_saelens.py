"""SAELens / datasets activation caches: built with `datasets` in SAELens's layout, then read."""

from __future__ import annotations

import json
import os
import re
import shlex

import numpy as np
import pytest
from datasets import Array2D, Dataset, Features, Sequence, Value

from jaxsae import cli
from jaxsae.config import DataConfig
from jaxsae.data import open_source
from jaxsae.data.saelens import SAELensCache
from jaxsae.data.shards import ShardWriter
from jaxsae.errors import ConfigError, DataError
from jaxsae.train import train
from tests.conftest import small_config

HOOK = "blocks.8.hook_resid_pre"
CTX, D_IN, ROWS = 8, 16, 300


def make_cache(path, *, rows=ROWS, dtype="float32", extra_hook=False, shards=3, seed=0):
    """A cache exactly as SAELens writes it; returns (path, activations [rows, ctx, d_in])."""
    rng = np.random.default_rng(seed)
    acts = np.abs(rng.standard_normal((rows, CTX, D_IN))).astype(dtype)
    columns = {HOOK: acts, "token_ids": rng.integers(0, 1000, (rows, CTX), dtype=np.int32)}
    features = {HOOK: Array2D(shape=(CTX, D_IN), dtype=dtype),
                "token_ids": Sequence(Value("int32"), length=CTX)}
    if extra_hook:
        columns["blocks.9.hook_resid_pre"] = acts * 2
        features["blocks.9.hook_resid_pre"] = Array2D(shape=(CTX, D_IN), dtype=dtype)
    Dataset.from_dict(columns, features=Features(features)).save_to_disk(
        str(path), num_shards=shards)
    return path, acts


def test_reads_every_token_in_order(tmp_path):
    path, acts = make_cache(tmp_path / "cache")
    source = open_source(DataConfig(path=str(path)))
    assert isinstance(source, SAELensCache)
    assert (source.n_tokens, source.d_in, source.context_size) == (ROWS * CTX, D_IN, CTX)
    flat = acts.reshape(-1, D_IN)
    np.testing.assert_array_equal(source.read(0, source.n_tokens), flat)
    for start, stop in [(0, 1), (795, 805), (1599, 1601), (2399, 2400), (17, 17)]:
        np.testing.assert_array_equal(source.read(start, stop), flat[start:stop])
    assert len({n for n in source.names}) >= 3  # one view per Arrow file / record batch


def test_float16_cache(tmp_path):
    path, acts = make_cache(tmp_path / "cache", dtype="float16")
    source = open_source(DataConfig(path=str(path), format="saelens"))
    np.testing.assert_array_equal(source.read(0, 40), acts.reshape(-1, D_IN)[:40]
                                  .astype(np.float32))


def test_a_float64_cache_beyond_float32_is_named_as_such(tmp_path, capsys):
    """(fault testing: a finite float64 value of 1e300 was "non-finite", after numpy's
    overflow warning and a source line)"""
    acts = np.ones((ROWS, CTX, D_IN))
    acts[20, 3, 5] = 1e300
    Dataset.from_dict({HOOK: acts}, features=Features(
        {HOOK: Array2D(shape=(CTX, D_IN), dtype="float64")})).save_to_disk(
        str(tmp_path / "cache"), num_shards=1)
    capsys.readouterr()
    assert cli.main(["data", "inspect", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"data-00000-of-00001.arrow: values beyond float32's range in row "
                        f"{20 * CTX + 3} (the first holds 1e+300; jaxsae computes in float32): "
                        "rescale the data"), err
    assert len(err.splitlines()) == 1


def test_hook_choice(tmp_path):
    path, acts = make_cache(tmp_path / "cache", extra_hook=True)
    with pytest.raises(DataError, match=r"data\.hook"):
        open_source(DataConfig(path=str(path)))
    source = open_source(DataConfig(path=str(path), hook="blocks.9.hook_resid_pre"))
    np.testing.assert_array_equal(source.read(0, 8), 2 * acts[0])
    with pytest.raises(DataError, match=r"data\.hook or --hook: 'blocks\.3"):
        open_source(DataConfig(path=str(path), hook="blocks.3.hook_resid_pre"))


def test_bad_caches_name_the_file(tmp_path):
    path, _ = make_cache(tmp_path / "cache")
    arrow = sorted(path.glob("*.arrow"))
    os.truncate(arrow[1], arrow[1].stat().st_size // 2)
    with pytest.raises(DataError, match=re.escape(arrow[1].name)):
        open_source(DataConfig(path=str(path)))
    arrow[2].unlink()
    state = json.loads((path / "state.json").read_text())
    state["_data_files"] = state["_data_files"][2:]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=re.escape(f"state.json: _data_files lists "
                                                  f"{arrow[2].name!r}, which is missing")):
        open_source(DataConfig(path=str(path)))
    # (fault testing: a directory was "missing", a NUL byte printed as it is)
    arrow[2].mkdir()
    with pytest.raises(DataError, match=re.escape(f"lists {arrow[2].name!r}, a directory, not "
                                                  "an Arrow file")):
        open_source(DataConfig(path=str(path)))
    state["_data_files"][0]["filename"] = "data\0.arrow"
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=re.escape("lists 'data\\x00.arrow', which is missing")):
        open_source(DataConfig(path=str(path)))
    (path / "dataset_info.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset_info\.json: not valid JSON"):
        open_source(DataConfig(path=str(path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a recognised activation directory"):
        open_source(DataConfig(path=str(empty)))


@pytest.mark.parametrize(("file", "edit", "match"), [
    ("dataset_info.json", lambda d: d.update(features=[1]), "'features' is not a mapping"),
    ("dataset_info.json", lambda d: d.update(features="x"), "'features' is not a mapping"),
    ("dataset_info.json", lambda d: d["features"][HOOK].update(shape=[8.0, D_IN]),
     "has shape [8.0"),
    ("dataset_info.json", lambda d: d["features"][HOOK].update(shape=[CTX]), "has shape"),
    ("dataset_info.json", lambda d: d["features"][HOOK].update(dtype=["float32"]),
     "has dtype ['float32'], not a dtype name"),
    ("state.json", lambda d: d.update(_data_files="abc"), "_data_files is not a list"),
    ("state.json", lambda d: d.update(_data_files=[1, 2]), "_data_files is not a list"),
    ("state.json", lambda d: d.update(_data_files={"a": 1}), "_data_files is not a list"),
    ("state.json", lambda d: d.update(_data_files=[{"filename": 5}]), "_data_files is not a list"),
    ("state.json", lambda d: d.update(_data_files=[{"name": "x"}]), "_data_files is not a list"),
    ("state.json", lambda d: d.update(_data_files=[]), "no _data_files listed"),
])
def test_malformed_cache_json_is_refused_naming_the_file(tmp_path, file, edit, match):
    """(fault testing: each of these ended in a traceback; a filename that was not text, or
    none, was 'no _data_files listed')"""
    path, _ = make_cache(tmp_path / "cache", shards=1)
    content = json.loads((path / file).read_text())
    edit(content)
    (path / file).write_text(json.dumps(content))
    with pytest.raises(DataError, match=re.escape(f"{path / file}: ") + ".*" + re.escape(match)):
        open_source(DataConfig(path=str(path)))


def test_a_column_never_read_may_have_a_variable_dimension(tmp_path):
    """datasets allows Array2D(shape=(None, d)); such a column beside the activations does not
    make the cache unreadable (a review: it was refused once shapes were checked)."""
    path, acts = make_cache(tmp_path / "cache", shards=1)
    info = json.loads((path / "dataset_info.json").read_text())
    info["features"]["extra"] = {"_type": "Array2D", "shape": [None, 4], "dtype": "int32"}
    (path / "dataset_info.json").write_text(json.dumps(info))
    source = open_source(DataConfig(path=str(path)))
    np.testing.assert_array_equal(source.read(0, 8), acts.reshape(-1, D_IN)[:8])


def test_a_cache_naming_files_outside_it_is_refused(tmp_path):
    path, _ = make_cache(tmp_path / "cache", shards=1)
    outside, _ = make_cache(tmp_path / "other", shards=1, seed=1)
    state = json.loads((path / "state.json").read_text())
    for name in (f"../other/{state['_data_files'][0]['filename']}",
                 str(outside / state["_data_files"][0]["filename"]), ".."):
        (path / "state.json").write_text(json.dumps(
            {**state, "_data_files": [{"filename": name}]}))
        listed = re.escape(repr(name))
        with pytest.raises(DataError, match=rf"state\.json: _data_files lists {listed}, not a "
                                            r"file name in the cache directory"):
            open_source(DataConfig(path=str(path)))


def test_a_file_listed_twice_a_dtype_that_disagrees_or_int_columns_are_refused(tmp_path):
    """(fault testing: a state.json listing one file twice was read twice, its "held-out"
    tokens being training tokens again; a dataset_info.json dtype other than the files' was
    never compared; an int32 column was "no Array2D activation column")"""
    path, _ = make_cache(tmp_path / "cache", shards=2)
    state = json.loads((path / "state.json").read_text())
    first = state["_data_files"][0]
    (path / "state.json").write_text(json.dumps({**state, "_data_files": [first, first]}))
    with pytest.raises(DataError, match=rf"state\.json: _data_files lists "
                                        rf"{re.escape(repr(first['filename']))} twice"):
        open_source(DataConfig(path=str(path)))
    (path / "state.json").write_text(json.dumps(state))
    info = json.loads((path / "dataset_info.json").read_text())
    info["features"][HOOK]["dtype"] = "float16"
    (path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"data-00000-of-00002\.arrow: column '{HOOK}' holds "
                                        r"float32 where dataset_info\.json says float16"):
        open_source(DataConfig(path=str(path)))
    info["features"][HOOK]["dtype"] = "int32"
    (path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"no Array2D activation column of a float dtype "
                                        rf"\({re.escape(HOOK)}: int32;"):
        open_source(DataConfig(path=str(path)))


def test_a_linked_file_and_an_empty_cache_are_refused(tmp_path):
    """(fault testing: an Arrow file that is a link to another was read twice; a cache of
    0 rows was a traceback in inspect, eval and analyze)"""
    path, _ = make_cache(tmp_path / "cache", shards=2)
    second = path / "data-00001-of-00002.arrow"
    second.unlink()
    os.symlink("data-00000-of-00002.arrow", second)
    with pytest.raises(DataError, match=r"data-00001-of-00002\.arrow: the same file as "
                                        r".*data-00000-of-00002\.arrow \(a link"):
        open_source(DataConfig(path=str(path)))
    empty, _ = make_cache(tmp_path / "empty", rows=0, shards=1)
    with pytest.raises(DataError, match=r"empty: holds no tokens \(its data file has no "
                                        r"rows\)"):
        open_source(DataConfig(path=str(empty)))
    assert cli.main(["data", "inspect", str(empty)]) == 2


def test_a_shape_that_disagrees_with_the_rows_is_refused(tmp_path):
    """dataset_info says [8, 16]; rows of [16, 8] have as many values and read as garbage."""
    path, _ = make_cache(tmp_path / "cache", shards=1)
    info = json.loads((path / "dataset_info.json").read_text())
    info["features"][HOOK]["shape"] = [D_IN, CTX]
    (path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"has rows of \[{CTX}\] positions where "
                                        rf"dataset_info\.json says \[{D_IN}, {CTX}\]"):
        open_source(DataConfig(path=str(path)))
    info["features"][HOOK]["shape"] = [CTX, D_IN]
    (path / "dataset_info.json").write_text(json.dumps(info))
    assert open_source(DataConfig(path=str(path))).d_in == D_IN


def test_check_finite_names_file_and_rows(tmp_path):
    rng = np.random.default_rng(1)
    acts = np.abs(rng.standard_normal((20, CTX, D_IN))).astype(np.float32)
    acts[13, 2, 5] = np.nan  # token 13*8+2 = 106: in the second of two shards (rows 10..19)
    Dataset.from_dict({HOOK: acts}, features=Features({HOOK: Array2D((CTX, D_IN), "float32")})
                      ).save_to_disk(str(tmp_path / "c"), num_shards=2)
    open_source(DataConfig(path=str(tmp_path / "c")))  # fine without the check
    with pytest.raises(DataError, match=r"data-00001-of-00002\.arrow: non-finite values in row "
                                        r"26$"):
        open_source(DataConfig(path=str(tmp_path / "c"), check_finite=True))


def test_train_and_inspect_a_cache(tmp_path, capsys):
    path, _ = make_cache(tmp_path / "cache", rows=1024)
    cfg = small_config(path, tmp_path / "run", data={"eval_tokens": 1024})
    result = train(cfg, progress=False)
    assert result.eval["tokens"] == 1024
    assert result.eval["explained_variance"] > 0
    assert cli.main(["data", "inspect", str(path), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "saelens" and summary["hook"] == HOOK
    assert summary["tokens"] == 1024 * CTX and summary["d_in"] == D_IN
    assert summary["unlisted"] == []
    # an Arrow file state.json does not list is named (fault testing: skipped silently)
    (path / "data-00003-of-00003.arrow").write_bytes(
        (path / "data-00000-of-00003.arrow").read_bytes())
    assert cli.main(["data", "inspect", str(path), "--no-progress"]) == 0
    assert ("unlisted    data-00003-of-00003.arrow (not in state.json: never read)"
            in capsys.readouterr().out)


def test_a_cache_with_two_columns_pairs_them_for_a_transcoder(tmp_path, capsys):
    """One cache holding the input and the target column (data.target = data.path,
    data.target_hook the target's column): pairs read row by row, a transcoder trains on
    them, and its export names both hooks."""
    path, acts = make_cache(tmp_path / "cache", rows=512, extra_hook=True)
    target_hook = "blocks.9.hook_resid_pre"
    data = {"hook": HOOK, "target": str(path), "target_hook": target_hook}
    source = open_source(DataConfig(path=str(path), **data))
    assert (source.d_in, source.d_out, source.n_tokens) == (D_IN, D_IN, 512 * CTX)
    rows = source.read(1000, 1100)
    flat = acts.reshape(-1, D_IN)[1000:1100]
    np.testing.assert_array_equal(rows, np.concatenate([flat, 2 * flat], axis=1))

    for bad, error in [
        ({"target_hook": None}, r"several activation columns .*data\.target_hook "
                                r"or --target-hook$"),
        ({"target_hook": HOOK}, r"data\.target_hook: 'blocks\.8\.hook_resid_pre' is also "
                                r"data\.hook"),
        ({"target_hook": "blocks.3.hook_resid_pre"},
         r"data\.target_hook or --target-hook: 'blocks\.3"),
    ]:
        with pytest.raises(DataError, match=error):
            open_source(DataConfig(path=str(path), **{**data, **bad}))
    other, _ = make_cache(tmp_path / "other", rows=500)  # a different number of tokens
    with pytest.raises(DataError, match=r"data\.target \(--target\): 4000 tokens, but "
                                        r"data\.path \(--data\) has 4096"):
        open_source(DataConfig(path=str(path), hook=HOOK, target=str(other)))
    shards = tmp_path / "shards"
    with ShardWriter(shards, D_IN) as writer:
        writer.write(flat)
    with pytest.raises(DataError, match="must be of one format"):
        open_source(DataConfig(path=str(path), hook=HOOK, target=str(shards)))
    with pytest.raises(DataError, match=r"data\.target_hook or --target-hook: .* is a jaxsae "
                                        r"shard directory"):
        open_source(DataConfig(path=str(shards), target=str(shards), target_hook=HOOK))
    # a hook given for a shard directory is refused, not ignored
    with pytest.raises(DataError, match=r"data\.hook or --hook: .* is a jaxsae shard dir"):
        open_source(DataConfig(path=str(shards), hook=HOOK))

    cfg = small_config(path, tmp_path / "run", data={**data, "eval_tokens": 512})
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["explained_variance"] > 0
    cfg_json = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert (cfg_json["architecture"], cfg_json["d_out"]) == ("transcoder", D_IN)
    meta = cfg_json["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"], meta["context_size"]) == (
        HOOK, target_hook, CTX)
    # the command the run printed evaluates it as it was evaluated (fault testing: the hint
    # left out the columns, and was refused on a cache of several)
    hint = capsys.readouterr().out.split("evaluate it with: ")[1].splitlines()[0]
    assert f"--hook {HOOK} --target {path} --target-hook {target_hook}" in hint
    assert cli.main(shlex.split(hint)[1:]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["explained_variance"] == pytest.approx(result["explained_variance"],
                                                         abs=1e-5)
    assert report["held_out_tokens"] == 512 and report["training_tokens"] == 0
    # another column of the same cache holds no tokens this SAE was trained on
    assert cli.main(["eval", str(tmp_path / "run" / "sae"), "--data", str(path), "--hook",
                     target_hook, "--target", str(path), "--target-hook", HOOK]) == 0
    captured = capsys.readouterr()
    assert "held_out_tokens" not in json.loads(captured.out)
    assert "are tokens the SAE was trained on" not in captured.err  # (none trained on)
    assert (f"note: {path}: reading the column {target_hook}; the SAE was trained on {HOOK}"
            in captured.err)  # (read as asked, said)


def test_import_onto_a_cache_of_several_columns_takes_the_hook_chosen(tmp_path):
    """(fault testing: import opened the data before applying data.hook, so a cache of two
    columns was refused asking for data.hook, the override just given); without one, the
    SAE's own metadata.hook_name is taken among several columns."""
    import jax
    import yaml

    from jaxsae.config import SAEConfig
    from jaxsae.export import export_sae, import_config
    from jaxsae.sae import init_params

    path, _ = make_cache(tmp_path / "cache", rows=512, extra_hook=True)
    params = init_params(jax.random.PRNGKey(0), D_IN, SAEConfig(d_sae=32))
    sae = export_sae(params, SAEConfig(d_sae=32), tmp_path / "sae")
    other = "blocks.9.hook_resid_pre"
    config = import_config(sae, tmp_path / "run", path, [f"data.hook={other}"])
    assert yaml.safe_load(config.read_text())["data"]["hook"] == other
    cfg_json = json.loads((sae / "cfg.json").read_text())
    cfg_json["metadata"]["hook_name"] = HOOK
    (sae / "cfg.json").write_text(json.dumps(cfg_json))
    config = import_config(sae, tmp_path / "run2", path)
    assert yaml.safe_load(config.read_text())["data"]["hook"] == HOOK
    # what import's own arguments set, or a whole data section, is refused as an override
    for assignment, match in ((f"data={{hook: {other}}}", "override data: would replace the "
                               "whole data section, whose path --data sets"),
                              ("run_dir=x", "override run_dir: set by --out"),
                              ("init_from=x", "override init_from: set by SAE_DIR")):
        with pytest.raises(ConfigError, match=re.escape(match)):
            import_config(sae, tmp_path / "run3", path, [assignment])
    assert not (tmp_path / "run3").exists()


def test_commands_read_the_column_the_sae_was_trained_on(tmp_path, capsys):
    """(fault testing: with a SAELens cache of several columns, eval / analyze / convert /
    repair / stitch refused without --hook although the SAE's cfg.json names its column, and a
    --hook of another column than the SAE's was read without a word.) Without --hook the
    SAE's column is read; another one is said on stderr; a width other than the SAE's is
    refused naming both."""
    import jax

    from jaxsae.config import SAEConfig
    from jaxsae.data import column_of, open_for_saes
    from jaxsae.export import export_sae, load_sae
    from jaxsae.sae import init_params

    path, acts = make_cache(tmp_path / "cache", rows=64, extra_hook=True, shards=1)
    params = init_params(jax.random.PRNGKey(0), D_IN, SAEConfig(d_sae=16))
    sae = export_sae(params, SAEConfig(d_sae=16), tmp_path / "sae",
                     metadata={"hook_name": "blocks.9.hook_resid_pre"})
    loaded = load_sae(sae)
    capsys.readouterr()  # (datasets' progress)
    source = open_for_saes(path, None, [loaded])
    assert column_of(source) == "blocks.9.hook_resid_pre"
    np.testing.assert_array_equal(source.read(0, 4), acts.reshape(-1, D_IN)[:4] * 2)
    assert capsys.readouterr().err == ""
    assert column_of(open_for_saes(path, HOOK, [loaded])) == HOOK
    assert capsys.readouterr().err.strip() == (
        f"note: {path}: reading the column {HOOK}; the SAE was trained on "
        "blocks.9.hook_resid_pre (cfg.json's metadata.hook_name)")
    narrow = export_sae(init_params(jax.random.PRNGKey(0), 4, SAEConfig(d_sae=8)),
                        SAEConfig(d_sae=8), tmp_path / "narrow")
    with pytest.raises(DataError, match=re.escape(
            f"{path}: d_in {D_IN} does not match the SAE's d_in 4")):
        open_for_saes(path, HOOK, [load_sae(narrow)])
    # the command: no --hook needed
    assert cli.main(["eval", str(sae), "--data", str(path), "--tokens", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 64
