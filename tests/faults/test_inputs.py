"""Bad files given to import and eval: one line naming the file and the field, exit 2, and
no number printed that was not measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxsae import cli, tensorfile
from jaxsae.data.synthetic import SuperpositionSpec, generate_superposition
from jaxsae.export import CFG_FILE, WEIGHTS_FILE
from tests.faults.conftest import refused


def _sae(run_copy: Path, tmp_path: Path) -> Path:
    sae = tmp_path / "sae"
    shutil.copytree(run_copy / "sae", sae)
    return sae


def _edit_cfg(sae: Path, **changes) -> None:
    cfg = json.loads((sae / CFG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (sae / CFG_FILE).write_text(json.dumps(cfg))


def _edit_own(sae: Path, **changes) -> None:
    cfg = json.loads((sae / CFG_FILE).read_text())
    _edit_cfg(sae, jaxsae={**cfg["jaxsae"], **changes})


def _saelens_sae(tmp_path: Path, **fields) -> Path:
    """A SAELens relu SAE of small_data's width (64 latents) that no jaxsae run trained (no
    `jaxsae` block), its cfg.json given `fields`."""
    import jax

    from jaxsae.config import SAEConfig
    from jaxsae.export import export_sae
    from jaxsae.sae import init_params

    cfg = SAEConfig(d_sae=64)
    sae = export_sae(init_params(jax.random.PRNGKey(0), 16, cfg), cfg, tmp_path / "saelens")
    _edit_cfg(sae, **{"jaxsae": None, **fields})
    return sae



@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: _edit_cfg(s, architecture="topk", k=None), "cfg.json: missing 'k'"),
    (lambda s: _edit_cfg(s, architecture=None), "cfg.json: missing 'architecture'"),
    (lambda s: (s / CFG_FILE).write_bytes(bytes(range(256))), "cfg.json: not a text file"),
    (lambda s: (s / CFG_FILE).write_text("[1, 2]"), "cfg.json: expected a JSON object"),
    # (fault testing: damaged records of what training left out were taken for an SAE
    # trained elsewhere, and the evaluation read other tokens without a word)
    (lambda s: _edit_own(s, drop_norm_above=-1),
     "cfg.json: jaxsae.drop_norm_above must be a number >= 1 (a multiple of the median norm) "
     "or null, got -1"),
    (lambda s: _edit_own(s, drop_norm_above=0.3), "drop_norm_above must be a number >= 1"),
    (lambda s: _edit_own(s, held_out_from="abc"),
     'cfg.json: jaxsae.held_out_from must be an integer >= 0 or null, got "abc"'),
    (lambda s: _edit_cfg(s, jaxsae=[1]), "cfg.json: 'jaxsae' must be a JSON object, got [1]"),
    (lambda s: tensorfile.write(s / WEIGHTS_FILE, {
        **{k: np.asarray(v) for k, v in tensorfile.read(s / WEIGHTS_FILE).items()},
        "W_dec": np.ones((64, 16), np.int32)}), "W_dec is int32"),
    (lambda s: tensorfile.write(s / WEIGHTS_FILE, {
        **{k: np.asarray(v) for k, v in tensorfile.read(s / WEIGHTS_FILE).items()},
        "b_dec": np.full(16, np.nan, np.float32)}), "b_dec has 16 non-finite values"),
])
def test_import_and_eval_refuse_a_damaged_sae(edit, match, run_copy, small_data, tmp_path,
                                              capsys):
    sae = _sae(run_copy, tmp_path)
    edit(sae)
    refused(["eval", str(sae), "--data", str(small_data)], capsys, match=match,
            unchanged=[sae])
    refused(["import", str(sae), "--out", str(tmp_path / "new"), "--data", str(small_data)],
            capsys, match=match, unchanged=[sae])
    assert not (tmp_path / "new").exists()


def test_eval_refuses_a_truth_that_is_not_one_before_evaluating(run_copy, small_data,
                                                                tmp_path, capsys,
                                                                monkeypatch):
    from jaxsae import evaluate

    def no_pass(*args, **kwargs):
        raise AssertionError("evaluated before --truth was checked")

    monkeypatch.setattr(evaluate, "reconstruction_metrics", no_pass)
    a_file = tmp_path / "afile"
    a_file.write_text("hi\n")
    sae = str(run_copy / "sae")
    refused(["eval", sae, "--data", str(small_data), "--truth", str(a_file)], capsys,
            match=f"--truth {a_file}: not a ground-truth directory or a truth.safetensors "
                  "file", unchanged=[a_file])
    for missing in (tmp_path / "nothing", tmp_path):  # no such path; a directory without it
        refused(["eval", sae, "--data", str(small_data), "--truth", str(missing)], capsys,
                match=f"--truth {missing}: not a ground-truth directory", unchanged=[])


def test_eval_refuses_the_truth_of_other_data(run_copy, small_data, tmp_path, capsys):
    other = generate_superposition(SuperpositionSpec(n_features=48, d_in=16, tokens=16384,
                                                     mean_l0=3.0, shard_tokens=4096, seed=4),
                                   tmp_path / "other", progress=False)
    refused(["eval", str(run_copy / "sae"), "--data", str(small_data), "--truth", str(other)],
            capsys, match="is not the truth of", unchanged=[other])
    capsys.readouterr()
    assert cli.main(["eval", str(run_copy / "sae"), "--data", str(small_data), "--truth",
                     str(small_data), "--tokens", "2048"]) == 0
    assert "mcc" in json.loads(capsys.readouterr().out)
    # the manifest intact, the rows not: a shard's rows reversed (the same truth.json)
    changed = tmp_path / "changed"
    shutil.copytree(small_data, changed)
    last = sorted(changed.glob("shard-*.npy"))[-1]
    np.save(last, np.load(last)[::-1])
    refused(["eval", str(run_copy / "sae"), "--data", str(changed), "--truth", str(changed),
             "--tokens", "2048"], capsys, match=f"error: {changed}: token 14,336 is not the "
             "one this truth generates", unchanged=[changed])
    # rows changed past the first evaluated (fault testing: only 64 rows were compared, and
    # 960 zeroed tokens got truth metrics)
    array = np.load(small_data / last.name)
    array[-960:] = 0
    np.save(last, array)
    refused(["eval", str(run_copy / "sae"), "--data", str(changed), "--truth", str(changed),
             "--tokens", "1024"], capsys, match=f"{changed}: token 15,424 is not the one this "
             "truth generates (difference 0.549 of a typical token's norm; 921 of the 1,024 "
             "tokens from 15,360 differ)", unchanged=[changed])  # (39 had no feature on)
    # data cut short: refused by eval and repair (a traceback), and a run says it has no
    # truth metrics for it (they went missing unsaid); fault testing
    shutil.rmtree(changed)
    shutil.copytree(small_data, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:3]
    (changed / "manifest.json").write_text(json.dumps(manifest))
    for argv in (["eval", str(run_copy / "sae"), "--data", str(changed), "--truth",
                  str(changed)],
                 ["repair", str(run_copy / "sae"), "--data", str(changed), "--truth",
                  str(changed), "--out", str(tmp_path / "repaired")]):
        refused(argv, capsys, unchanged=[changed], match=f"{changed} holds 12,288 tokens but "
                "the truth describes 16,384")
    assert not (tmp_path / "repaired").exists()


def _edit_truth(directory: Path, edit) -> None:
    file = directory / "truth.safetensors"
    arrays = {k: np.array(v) for k, v in tensorfile.read(file).items()}
    edit(arrays)
    tensorfile.write(file, arrays)


def test_a_damaged_truth_is_refused_naming_its_file_before_any_work(run_copy, small_data,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    """(fault testing: a truth.safetensors with fewer directions, a tensor missing, or NaN
    directions trained every step and then failed in a traceback, on every rerun, and eval
    failed after its pass; edited firing probabilities were blamed on the data; a bare truth
    of zero rows gave an MCC of 0.0 as if measured.)"""
    from jaxsae import evaluate
    from jaxsae.config import config_from_dict
    from jaxsae.errors import DataError
    from jaxsae.train import train
    from tests.conftest import small_config_dict

    def no_pass(*args, **kwargs):
        raise AssertionError("evaluated before --truth was checked")

    monkeypatch.setattr(evaluate, "reconstruction_metrics", no_pass)
    sae = str(run_copy / "sae")
    edits = {"fewer": lambda t: t.update(directions=t["directions"][:10]),
             "missing": lambda t: t.pop("firing_prob"),
             "nan": lambda t: t["directions"].__setitem__(3, np.nan)}
    for name, edit in edits.items():
        data = tmp_path / name
        shutil.copytree(small_data, data)
        _edit_truth(data, edit)
        file = data / "truth.safetensors"
        refused(["eval", sae, "--data", str(data), "--truth", str(data)], capsys,
                match=f"{file}: not the file `jaxsae synth` wrote", unchanged=[data])
    tree = small_config_dict(tmp_path / "nan", tmp_path / "nan-run")
    with pytest.raises(DataError, match="not the file `jaxsae synth` wrote"):
        train(config_from_dict(tree), progress=False, log=lambda m: None)
    assert not (tmp_path / "nan-run").exists()
    # a bare truth file: no digest to compare, its directions checked
    for name, rows, match in (("nan", [3], "'directions' row 3 is not finite (1 such rows)"),
                              ("zero", slice(None), "'directions' row 0 has norm 0 (48 such")):
        bare = tmp_path / f"bare-{name}"
        bare.mkdir()
        directions = np.array(tensorfile.read(small_data / "truth.safetensors")["directions"])
        directions[rows] = np.nan if name == "nan" else 0.0
        tensorfile.write(bare / "truth.safetensors", {"directions": directions})
        refused(["eval", sae, "--data", str(small_data), "--truth",
                 str(bare / "truth.safetensors")], capsys, match=match, unchanged=[bare])


def test_eval_refuses_non_finite_held_out_tokens(run_copy, small_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    last = sorted(data.glob("shard-*.npy"))[-1]
    array = np.load(last)
    array[-5] = np.nan  # only in the held-out tokens at the end
    np.save(last, array)
    line = refused(["eval", str(run_copy / "sae"), "--data", str(data), "--tokens", "2048"],
                   capsys, match="non-finite values (NaN or inf) in row 4091 (1 token of",
                   unchanged=[data])
    assert str(last) in line
    # training refuses them before its first step (fault testing: after its last one)
    from jaxsae.errors import DataError
    from jaxsae.train import train
    from tests.conftest import small_config

    with pytest.raises(DataError, match=r"row 4091 .*among the 2,048 tokens held out for the "
                                        r"evaluation at the end of the run; checked before"):
        train(small_config(data, tmp_path / "fresh"), progress=False, log=lambda m: None)
    assert not (tmp_path / "fresh").exists()


def test_import_writes_a_config_that_trains_on_small_data(run_copy, small_data, tmp_path,
                                                          capsys):
    sae = _sae(run_copy, tmp_path)
    _edit_cfg(sae, metadata={**json.loads((sae / CFG_FILE).read_text())["metadata"],
                             "model_name": "gpt2", "prepend_bos": False, "hook_head_index": 3})
    run = tmp_path / "finetune"
    capsys.readouterr()
    # what the flags set is not overridden (data.path=... silently won over --data, relative)
    for key in ("data.path", "init_from", "run_dir"):
        assert cli.main(["import", str(sae), "--out", str(run), "--data", str(small_data),
                         f"{key}=elsewhere"]) == 2
        assert f"override {key}: set by" in capsys.readouterr().err and not run.exists()
    # nor is an override given twice (review: the last was taken)
    assert cli.main(["import", str(sae), "--out", str(run), "--data", str(small_data),
                     "optim.lr=1e-3", "optim.lr=3e-3"]) == 2
    assert "override optim.lr: given twice" in capsys.readouterr().err and not run.exists()
    assert cli.main(["import", str(sae), "--out", str(run), "--data", str(small_data)]) == 0
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["loss"] == [{"term": "mse", "coefficient": 1.0},
                               {"term": "l1", "coefficient": 0.1}]  # as the source trained
    assert written["optim"]["lr"] == 3e-3
    assert Path(written["data"]["path"]).is_absolute() and Path(written["init_from"]).is_absolute()
    assert written["optim"]["warmup_steps"] == "auto"
    # the source's data: what it held out stays held out (fault testing: the default hold-out
    # fine-tuned on tokens the source was evaluated on)
    source = json.loads((sae / CFG_FILE).read_text())
    assert written["data"]["eval_tokens"] == 16384 - source["jaxsae"]["held_out_from"]
    assert cli.main(["train", str(run / "config.yaml"), "--no-progress",
                     "log.curves=false"]) == 0  # (curves: drawn where tested)
    assert (run / "sae" / CFG_FILE).is_file()
    finetuned = json.loads((run / "sae" / CFG_FILE).read_text())
    assert finetuned["jaxsae"]["held_out_from"] == source["jaxsae"]["held_out_from"]
    # what the source says of its model, which the data does not (fault testing: lost)
    assert {k: finetuned["metadata"][k] for k in ("model_name", "prepend_bos",
                                                  "hook_head_index")} == {
        "model_name": "gpt2", "prepend_bos": False, "hook_head_index": 3}


def test_analysis_flags_that_would_do_nothing_or_name_a_file_are_refused(run_copy, small_data,
                                                                        tmp_path, capsys):
    """(fault testing: analyze took --sparsity-weight without --optimality and ignored it;
    repair --truth DIR/manifest.json said `.../manifest.json/truth.json: not found`)"""
    refused(["analyze", str(run_copy / "sae"), "--data", str(small_data), "--out",
             str(tmp_path / "a"), "--sparsity-weight", "1"], capsys,
            match="--sparsity-weight: weighs the optimality test; add --optimality",
            unchanged=[])
    refused(["repair", str(run_copy / "sae"), "--data", str(small_data), "--out",
             str(tmp_path / "r"), "--truth", str(small_data / "manifest.json")], capsys,
            match=f"{small_data / 'manifest.json'}: not a directory written by `jaxsae synth`",
            unchanged=[small_data])
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()


def test_analysis_of_a_single_latent_is_refused_in_one_line(small_data, tmp_path, capsys):
    """(fault testing: analyze and repair of a d_sae 1 SAE ended in a traceback)"""
    from jaxsae.config import DataConfig, SAEConfig
    from jaxsae.data import open_source
    from jaxsae.export import export_sae

    d_in = open_source(DataConfig(path=str(small_data))).d_in
    rng = np.random.default_rng(0)
    one = export_sae({"W_enc": rng.normal(size=(d_in, 1)), "W_dec": rng.normal(size=(1, d_in)),
                      "b_enc": np.zeros(1), "b_dec": np.zeros(d_in)}, SAEConfig(d_sae=1),
                     tmp_path / "one")
    for command in ("analyze", "repair"):
        refused([command, str(one), "--data", str(small_data), "--out",
                 str(tmp_path / command), "--no-progress"], capsys, unchanged=[one],
                match=f"{one}: has 1 latent; its feature geometry")
        assert not (tmp_path / command).exists()


def test_a_run_directory_given_for_its_sae_is_pointed_to_it(run_copy, small_data, capsys,
                                                            tmp_path):
    refused(["eval", str(run_copy), "--data", str(small_data)], capsys,
            match=f"missing cfg.json (not a SAELens or sparsify export; a training run's SAE "
                  f"is {run_copy / 'sae'})", unchanged=[run_copy])
    # a folder of several (sparsify's run folder, the Hub layout): its sub-folders are named
    # (fault testing: "not a SAELens export", whatever it held)
    folder = tmp_path / "saes"
    for name in ("layers.3", "layers.5"):
        shutil.copytree(run_copy / "sae", folder / name)
    refused(["eval", str(folder), "--data", str(small_data)], capsys,
            match=f"{folder}: missing cfg.json (not a SAELens or sparsify export; it holds SAEs "
                  "in sub-folders: layers.3, layers.5 (give one))", unchanged=[folder])
    # a sweep's run (sweep/<i>/sae) and its export (sweep/<i>): where its SAEs are
    # (fault testing: nothing was said)
    for inner, name in (("sae", "sweep-run"), (".", "sweep-export")):
        sweep = tmp_path / name
        for i in ("00", "01"):
            shutil.copytree(run_copy / "sae", sweep / "sweep" / i / inner)
        where = "sweep/00/sae, sweep/01/sae" if inner == "sae" else "sweep/00, sweep/01"
        refused(["eval", str(sweep), "--data", str(small_data)], capsys,
                match=f"it holds SAEs in sub-folders: {where} (give one)", unchanged=[sweep])


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c["metadata"].update(training_architecture_details=[1]),
     "metadata.training_architecture_details must be a JSON object or null, got [1]"),
    (lambda c: c["jaxsae"].update(optim=[1]), "jaxsae.optim must be a JSON object or null"),
    (lambda c: c["jaxsae"].update(optim={"batch_size": 0}),
     "jaxsae.optim.batch_size must be a positive integer or null, got 0"),
])
def test_import_refuses_a_damaged_training_record_in_one_line(edit, match, run_copy,
                                                              small_data, tmp_path, capsys):
    """(fault testing: each was a traceback; `metadata: null` too, which now reads as none)"""
    sae = _sae(run_copy, tmp_path)
    cfg = json.loads((sae / CFG_FILE).read_text())
    edit(cfg)
    (sae / CFG_FILE).write_text(json.dumps(cfg))
    refused(["import", str(sae), "--out", str(tmp_path / "imported"), "--data", str(small_data)],
            capsys, unchanged=[sae], match=f"{sae / CFG_FILE}: {match}")
    cfg["metadata"] = None
    cfg["jaxsae"].pop("optim", None)
    (sae / CFG_FILE).write_text(json.dumps(cfg))
    assert cli.main(["import", str(sae), "--out", str(tmp_path / "imported"), "--data",
                     str(small_data)]) == 0


def test_import_names_the_cfg_json_for_a_bad_training_setting(run_copy, small_data,
                                                              tmp_path, capsys):
    """(fault testing: a cfg.json's negative coefficient was refused as `loss[1].coefficient`,
    a key the user never wrote); an override of that key fixes it."""
    sae = _sae(run_copy, tmp_path)
    cfg = json.loads((sae / CFG_FILE).read_text())
    cfg["jaxsae"]["loss"][1]["coefficient"] = -5
    (sae / CFG_FILE).write_text(json.dumps(cfg))
    out = tmp_path / "imported"
    refused(["import", str(sae), "--out", str(out), "--data", str(small_data)], capsys,
            unchanged=[sae], match=f"{sae / CFG_FILE}: its training settings give "
                                   "loss[1].coefficient: must be >= 0")
    refused(["import", str(sae), "--out", str(out), "--data", str(small_data),
             "loss[1].coefficient=-1"], capsys, unchanged=[sae],
            match="error: loss[1].coefficient: must be >= 0, got -1")
    assert cli.main(["import", str(sae), "--out", str(out), "--data", str(small_data),
                     "loss[1].coefficient=0.5"]) == 0
    # one the run's own checks refuse (a helper: SAELens's lp_norm 2 was not named)
    cfg["jaxsae"]["loss"][1] = {"term": "l1", "coefficient": 1.0, "p": 2.0}
    (sae / CFG_FILE).write_text(json.dumps(cfg))
    refused(["import", str(sae), "--out", str(tmp_path / "again"), "--data", str(small_data),
             "data.eval_tokens=2048"], capsys, unchanged=[sae],
            match=f"{sae / CFG_FILE}: its training settings give loss[1].p: must be in (0, 1]")


def test_import_shortens_a_ramp_longer_than_its_run(run_copy, small_data, tmp_path, capsys):
    """(fault testing: the source's loss.l1.warmup_steps 50, longer than the fine-tune on small
    data, made import refuse the config it had just built)"""
    sae = _sae(run_copy, tmp_path)
    cfg = json.loads((sae / CFG_FILE).read_text())
    cfg["jaxsae"]["loss"][1]["warmup_steps"] = 100_000
    (sae / CFG_FILE).write_text(json.dumps(cfg))
    run = tmp_path / "imported"
    assert cli.main(["import", str(sae), "--out", str(run), "--data", str(small_data)]) == 0
    written = yaml.safe_load((run / "config.yaml").read_text())
    steps = written["optim"]["total_tokens"] // written["optim"]["batch_size"]
    assert written["loss"][1]["warmup_steps"] == steps


def test_import_takes_sweep_overrides_as_train_does(small_data, tmp_path, capsys):
    """(fault testing: `sweep.optim.lr=[...]` was refused as a key `sweep.optim`, its values
    shown as strings; import now applies overrides with train's code)"""
    sae = _saelens_sae(tmp_path)
    run = tmp_path / "imported"
    assert cli.main(["import", str(sae), "--out", str(run), "--data", str(small_data),
                     "sweep.optim.lr=[1e-3, 2e-3]"]) == 0
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["sweep"] == [{"optim.lr": 1e-3}, {"optim.lr": 2e-3}]
    refused(["import", str(sae), "--out", str(tmp_path / "other"), "--data", str(small_data),
             "sweep.optim.lr=[1e-3]", "sweep=[{optim.lr: 1e-3}]"], capsys, unchanged=[sae],
            match="override sweep: replaces what sweep.optim.lr=[1e-3] set")


def test_import_sizes_the_run_to_the_hold_out_an_override_gives(small_data, tmp_path, capsys):
    """(fault testing: the batch and optim.total_tokens were sized to import's own hold-out,
    before data.eval_tokens=N was applied: the config trained twice over its tokens, or was
    refused by train); a hold-out that leaves less than a batch is refused in import."""
    sae = _saelens_sae(tmp_path)
    for eval_tokens, batch in ((8192, 256), (16000, 16)):  # halved until 20 batches fit
        run = tmp_path / f"imported{eval_tokens}"
        assert cli.main(["import", str(sae), "--out", str(run), "--data", str(small_data),
                         f"data.eval_tokens={eval_tokens}"]) == 0
        written = yaml.safe_load((run / "config.yaml").read_text())
        assert written["data"]["eval_tokens"] == eval_tokens
        assert written["optim"]["batch_size"] == batch  # one pass over the tokens left
        assert written["optim"]["total_tokens"] == (16384 - eval_tokens) // batch * batch
    refused(["import", str(sae), "--out", str(tmp_path / "none"), "--data", str(small_data),
             "data.eval_tokens=16384"], capsys, unchanged=[sae],
            match=f"{small_data}: 16384 tokens leave 0 for training after data.eval_tokens "
                  "(16384); need at least optim.batch_size (8)")
    refused(["import", str(sae), "--out", str(tmp_path / "none"), "--data", str(small_data),
             "optim.batch_size=16384", "optim.total_tokens=16384"], capsys, unchanged=[sae],
            match="need at least optim.batch_size (16384)")  # as train would refuse it
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("fields", "match"), [
    ({"l1_coefficient": "five"}, 'l1_coefficient must be a finite number or null, got "five"'),
    ({"l1_coefficient": float("nan")}, "l1_coefficient must be a finite number or null, got NaN"),
    ({"lp_norm": True}, "lp_norm must be a finite number or null, got true"),
    ({"l1_coefficient": 10**400}, "l1_coefficient must be a finite number or null, got 1000"),
    ({"metadata": {"training_architecture_details": {"l0_coefficient": [1]}}},
     "metadata.training_architecture_details.l0_coefficient must be a finite number or null, "
     "got [1]"),
    ({"jaxsae": {"loss": "mse"}},
     'jaxsae.loss must be a non-empty JSON list of terms or null, got "mse"'),
    # (fault testing: 0 was refused naming sae.jumprelu_bandwidth, by eval too)
    ({"jumprelu_bandwidth": 0}, "jumprelu_bandwidth must be > 0 or null, got 0"),
])
def test_import_refuses_a_malformed_training_field(fields, match, small_data, tmp_path, capsys):
    """(fault testing: each was imported without a word as if absent: coefficient 1.0, or
    SAELens's fields read in place of jaxsae's loss); an absent or null field is the default."""
    sae = _saelens_sae(tmp_path, **fields)
    refused(["import", str(sae), "--out", str(tmp_path / "imported"), "--data", str(small_data)],
            capsys, unchanged=[sae], match=f"{sae / CFG_FILE}: {match}")
    assert not (tmp_path / "imported").exists()
    _edit_cfg(sae, **{key: None for key in fields})  # (None: the key removed)
    _edit_cfg(sae, l1_coefficient=2.0, metadata={"training_architecture_details": {
        "lp_norm": None, "l1_coefficient": 5.0}})  # (the top level is read first)
    assert cli.main(["import", str(sae), "--out", str(tmp_path / "imported"), "--data",
                     str(small_data)]) == 0
    written = yaml.safe_load((tmp_path / "imported" / "config.yaml").read_text())
    assert written["loss"] == [{"term": "mse", "coefficient": 1.0},
                               {"term": "l1", "coefficient": 2.0}]
