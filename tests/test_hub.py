"""`jaxsae export --hub` (the folder SAELens users upload, with its model card) and
`--format sparsify` / importing sparsify directories, checked in jaxsae's own terms; the real
sparsify package reads them in tests/interop/test_sparsify.py."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest
import yaml

from jaxsae import cli, curves, hub, sae, tensorfile
from jaxsae.config import DataConfig
from jaxsae.data import open_source
from jaxsae.data.shards import ShardWriter
from jaxsae.errors import ExportError
from jaxsae.export import load_sae
from jaxsae.sparsify import export_sparsify, is_sparsify, read_sparsify
from jaxsae.train import train
from tests.conftest import small_config


@pytest.fixture(scope="module")
def lm_like_data(tmp_path_factory):
    """Activations that say which model and hook they came from, as `jaxsae cache` writes."""
    out = tmp_path_factory.mktemp("lm") / "acts"
    rng = np.random.default_rng(0)
    source = {"model": "HuggingFaceTB/SmolLM2-135M", "layer": 3,
              "hook": "blocks.3.hook_resid_post", "context": 128}
    with ShardWriter(out, 16, shard_tokens=8192, source=source) as writer:
        writer.write(rng.normal(size=(16384, 16)).astype(np.float32))
    return out


def _export(argv, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["export", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_hub_folder_of_one_sae(lm_like_data, small_data, tmp_path, capsys, monkeypatch):
    """(fault testing: the card's curves.png of a --step export was a copy of the run's,
    which went on past the checkpoint exported, beside that checkpoint's figures; export
    --data OTHER named OTHER's model and hook, or none, as the SAE's) Its curves end at the
    step exported; the model and hook are those of the data trained on."""
    cfg = small_config(lm_like_data, tmp_path / "run", log={"every_steps": 4, "curves": True})
    result = train(cfg, progress=False)
    out = tmp_path / "hub"
    printed = _export([str(tmp_path / "run"), "--out", str(out), "--hub"], capsys)
    assert f"huggingface-cli upload USER/REPO {out} ." in printed
    folder = out / "blocks.3.hook_resid_post"
    loaded = load_sae(folder)
    meta = loaded.cfg_json["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["context_size"] == 128
    assert meta["dataset_path"] == str(lm_like_data)
    assert meta["training_tokens"] == 24 * 256
    for key in ("l0", "explained_variance", "dead_fraction"):
        assert meta[f"eval_{key}"] == pytest.approx(result.eval[key], rel=1e-5), key
    np.testing.assert_array_equal(loaded.params["W_dec"], load_sae(result.sae_dir).params["W_dec"])
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "saelens" and front["base_model"] == meta["model_name"]
    assert "`blocks.3.hook_resid_post`" in card and f"{result.eval['l0']:.2f}" in card
    assert "![training curves](curves.png)" in card and "sae:\n  d_sae: 64" in card
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "at the end of training" in card and "eval_dataset_path" not in meta
    # (fault testing: export --data OTHER wrote OTHER as the data trained on, in cfg.json
    # and the card, and called an earlier checkpoint's figures "the end of training")
    other = tmp_path / "other"
    shutil.copytree(lm_like_data, other)
    drawn, draw = [], curves.plot
    monkeypatch.setattr(curves, "plot", lambda series, out, title="": drawn.append(
        [line["step"] for line in series[0][1]]) or draw(series, out, title=title))
    _export([str(tmp_path / "run"), "--out", str(tmp_path / "hub2"), "--hub", "--data",
             str(other), "--step", "16"], capsys)
    assert drawn == [[4, 8, 12, 16]] and (tmp_path / "hub2" / "curves.png").is_file()
    meta = load_sae(tmp_path / "hub2" / "blocks.3.hook_resid_post").cfg_json["metadata"]
    assert meta["dataset_path"] == str(lm_like_data) and meta["eval_dataset_path"] == str(other)
    # where the training tokens end is read from the training data, not from OTHER
    n = open_source(DataConfig(path=str(lm_like_data))).n_tokens
    assert load_sae(tmp_path / "hub2" / "blocks.3.hook_resid_post").cfg_json["jaxsae"][
        "held_out_from"] == n - cfg.data.held_out(n)
    card = (tmp_path / "hub2" / "README.md").read_text()
    assert f"tokens of `{other}` after 4,096 training tokens (a checkpoint before" in card
    # evaluated on data of no model or hook: the SAE's are still the training data's
    _export([str(tmp_path / "run"), "--out", str(tmp_path / "hub3"), "--hub", "--data",
             str(small_data)], capsys)
    meta = load_sae(tmp_path / "hub3" / "blocks.3.hook_resid_post").cfg_json["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M" and meta["context_size"] == 128
    assert meta["eval_dataset_path"] == str(small_data)


def test_hub_folder_of_a_sweep_on_synthetic_data(small_data, tmp_path, capsys, monkeypatch):
    cfg = small_config(small_data, tmp_path / "run", sweep={"sae.k": [2, 4]},
                       sae={"activation": "topk", "k": 4})
    result = train(cfg, progress=False)
    out = tmp_path / "hub"
    _export([str(tmp_path / "run"), "--out", str(out), "--hub"], capsys)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["test__sae.k-2", "test__sae.k-4"]
    for folder, member in zip(folders, result.sweep, strict=True):
        meta = json.loads((out / folder / "cfg.json").read_text())["metadata"]
        assert meta["eval_l0"] == pytest.approx(member.eval["l0"], rel=1e-5)
    card = (out / "README.md").read_text()
    assert "base_model" not in card and "2 sparse autoencoders" in card
    assert "curves.png" not in card  # the run drew none (log.curves: false)
    # The export is jaxsae's own: a second one replaces it; a foreign directory is refused.
    _export([str(tmp_path / "run"), "--out", str(out), "--hub"], capsys)
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(out), "--hub",
                     "--format", "sparsify"]) == 2
    assert "--hub writes the SAELens layout" in capsys.readouterr().err
    # export --data OTHER: each SAE records where its training ended in its own data, which
    # is opened once for the sweep (fault testing: once per SAE, a manifest read each time)
    from jaxsae import finish

    other, opened = tmp_path / "other", []
    shutil.copytree(small_data, other)

    def counting(data, **kwargs):
        opened.append(data.path)
        return open_source(data, **kwargs)

    monkeypatch.setattr(finish, "open_source", counting)
    _export([str(tmp_path / "run"), "--out", str(tmp_path / "other_out"), "--data", str(other)],
            capsys)
    n = open_source(DataConfig(path=str(small_data))).n_tokens
    for i in range(2):
        assert load_sae(tmp_path / "other_out" / "sweep" / f"0{i}").cfg_json["jaxsae"][
            "held_out_from"] == n - cfg.data.held_out(n)
    assert [p for p in opened if p == str(small_data)] == [str(small_data)]


def test_sparsify_export_holds_the_saelens_weights(small_data, tmp_path, capsys):
    cfg = small_config(small_data, tmp_path / "run", sae={"activation": "topk", "k": 4})
    result = train(cfg, progress=False)
    out = tmp_path / "sp"
    _export([str(tmp_path / "run"), "--out", str(out), "--format", "sparsify"], capsys)
    assert is_sparsify(out) and not is_sparsify(result.sae_dir)
    # exporting again replaces it, as a SAELens export is replaced (it asked for --overwrite)
    _export([str(tmp_path / "run"), "--out", str(out), "--format", "sparsify"], capsys)
    cfg_json = json.loads((out / "cfg.json").read_text())
    assert cfg_json == {"activation": "topk", "expansion_factor": 4, "normalize_decoder": False,
                        "num_latents": 64, "k": 4, "multi_topk": False,
                        "skip_connection": False, "transcode": False, "d_in": 16}
    assert set(tensorfile.read(out / "sae.safetensors")) == {
        "encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    params, sae_cfg, _ = read_sparsify(out)
    saelens = load_sae(result.sae_dir)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(params[name], saelens.params[name])
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sae.encode(params, x, sae_cfg)),
                                  np.asarray(sae.encode(saelens.params, x, saelens.sae)))
    # the commands that read SAEs read the sparsify directory as its SAELens export
    capsys.readouterr()
    figures = []
    for directory in (out, result.sae_dir):
        assert cli.main(["eval", str(directory), "--data", str(small_data), "--tokens", "2048",
                         "--no-progress"]) == 0
        figures.append(json.loads(capsys.readouterr().out))
    # (sparsify's cfg.json does not say which tokens of the data were trained on)
    assert figures[1].pop("training_tokens") == 0 and figures[1].pop("held_out_tokens") == 2048
    assert figures[0] == figures[1]


def test_sparsify_refusals(small_data, tmp_path, capsys):
    train(small_config(small_data, tmp_path / "relu"), progress=False)
    assert cli.main(["export", str(tmp_path / "relu"), "--out", str(tmp_path / "sp"),
                     "--format", "sparsify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sparsify encodes with a per-token TopK" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sp").exists()
    params = {"W_enc": np.ones((16, 8), np.float32), "b_enc": np.zeros(8, np.float32),
              "W_dec": np.ones((8, 16), np.float32), "b_dec": np.zeros(16, np.float32)}
    from jaxsae.config import SAEConfig

    good = export_sparsify(params, SAEConfig(d_sae=8, activation="topk", k=2), tmp_path / "g")
    cfg = json.loads((good / "cfg.json").read_text())
    for change, match in [({"transcode": True}, "a sparsify transcoder"),
                          ({"skip_connection": True}, "a skip connection"),
                          ({"activation": "groupmax"}, "activation 'groupmax'"),
                          ({"k": 9}, "k 9 must be in 1..num_latents"),
                          ({"num_latents": 9}, "encoder.weight has shape")]:
        (good / "cfg.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ExportError, match=match):
            read_sparsify(good)


def test_import_of_a_sparsify_directory_trains(small_data, tmp_path, capsys):
    rng = np.random.default_rng(3)
    W_dec = rng.normal(size=(32, 16)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {"W_enc": W_dec.T.copy(), "b_enc": np.zeros(32, np.float32), "W_dec": W_dec,
              "b_dec": np.zeros(16, np.float32)}
    from jaxsae.config import SAEConfig

    src = export_sparsify(params, SAEConfig(d_sae=32, activation="topk", k=3,
                                            decoder_norm="unit"), tmp_path / "eleuther")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    run = tmp_path / "imported run"
    capsys.readouterr()
    assert cli.main(["import", str(src), "--out", str(run), "--data",
                     str(small_data), "optim.total_tokens=2048"]) == 0
    hint = shlex.split(capsys.readouterr().out.split("train it with: ")[1])
    assert hint == ["jaxsae", "train", str(run / "config.yaml")]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["init_from"] == str(run / "imported-sae")
    assert config["sae"]["activation"] == "topk" and config["sae"]["k"] == 3
    assert config["sae"]["decoder_norm"] == "unit"
    # (fault testing: the converted directory's record was read as a jaxsae run's of before
    # 0.2.0: "normalize: none assumed", and its rows as free)
    assert "assumed" not in (run / "config.yaml").read_text()
    np.testing.assert_array_equal(load_sae(run / "imported-sae").params["W_dec"], W_dec)
    assert cli.main([*hint[1:], "--no-progress", "log.curves=false"]) == 0  # (read nowhere)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_a_sparsify_config_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "cfg.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="expected a JSON object"):
        read_sparsify(tmp_path)


def test_folder_names():
    assert hub.folder_name("blocks.1.hook_resid_post", "run", None) == "blocks.1.hook_resid_post"
    assert hub.folder_name(None, "my run", None) == "my-run"
    assert hub.folder_name(None, "sw2", {}) == "sw2"  # a point that varies nothing: no "__"
    named = hub.folder_name(None, "sw", {"optim.lr": 0.001, "sae.k": 4})
    assert named == "sw__optim.lr-0.001_sae.k-4"
    # (fault testing: a bench arm's long name made a folder name the file system refused)
    long = [hub.folder_name(None, "bench-" + "y" * 250, {"sae.k": k}) for k in (2, 3)]
    assert all(len(name.encode()) <= 200 for name in long) and long[0] != long[1]
    assert long[0].startswith("bench-yyy")
