"""The evaluation window (jaxsae.data.window): every command that evaluates an SAE on data
leaves out the outlier tokens its training left out (data.drop_norm_above), as the training
run's own final evaluation does. Each is checked against the same command on the data with
those tokens removed beforehand."""

from __future__ import annotations

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import cli, evaluate, export
from jaxsae.config import DataConfig, SAEConfig
from jaxsae.data import open_source, synthetic
from jaxsae.data.shards import ShardSet, ShardWriter
from jaxsae.data.source import ArraySource
from jaxsae.data.window import TRAINED, Window, drop_multiple, trained_drop, trained_end

D_IN, D_SAE, N = 16, 12, 12288
SINK_EVERY = 97


def _write(path, x):
    with ShardWriter(path, D_IN, shard_tokens=4096) as w:
        w.write(x)
    return path


@pytest.fixture(scope="module")
def sinks(tmp_path_factory):
    """Superposition data at norm ~3 with every 97th token an 'attention sink' of norm 300,
    the same data with the sinks removed, and two ReLU SAEs and a TopK SAE exported as
    trained with data.drop_norm_above 10 (the ReLU pair: decoders near the true directions)."""
    root = tmp_path_factory.mktemp("sinks")
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((D_SAE, D_IN))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = (rng.random((N, D_SAE)) < 3 / D_SAE) * rng.uniform(1, 3, (N, D_SAE))
    x = (codes @ directions).astype(np.float32)
    sink = np.zeros(N, bool)
    sink[::SINK_EVERY] = True
    x[sink] = 300.0 * directions[0] + rng.standard_normal((sink.sum(), D_IN)).astype(np.float32)
    noisy = (directions + 0.1 * rng.standard_normal(directions.shape)).astype(np.float32)
    saes = {}
    for name, cfg, W_dec in [
            ("relu", SAEConfig(d_sae=D_SAE, activation="relu", decoder_norm="free"), noisy),
            ("relu_wide", SAEConfig(d_sae=2 * D_SAE, activation="relu", decoder_norm="free"),
             (np.concatenate([directions, directions]) + 0.2 * rng.standard_normal(
                 (2 * D_SAE, D_IN))).astype(np.float32)),
            ("topk", SAEConfig(d_sae=D_SAE, activation="topk", k=3, decoder_norm="free"),
             noisy)]:
        params = {"W_dec": W_dec, "W_enc": np.ascontiguousarray(W_dec.T),
                  "b_enc": np.full(len(W_dec), -0.5, np.float32),
                  "b_dec": np.zeros(D_IN, np.float32)}
        saes[name] = export.export_sae(params, cfg, root / name,
                                       training={"drop_norm_above": 10.0})
    return {"root": root, "x": x, "sink": sink, "saes": saes,
            "data": _write(root / "data", x), "clean": _write(root / "clean", x[~sink])}


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.split("\nwrote ")[0].split("\nopen ")[0])


def test_the_window_leaves_out_rows_above_the_multiple_of_its_own_median(sinks):
    x, sink = sinks["x"], sinks["sink"]
    source = ShardSet(sinks["data"])
    start = 5000
    window = Window.dropping(source, start, batch_size=1000, multiple=10.0)
    norms = np.linalg.norm(x[start:].astype(np.float64), axis=1)
    assert window.median_norm == pytest.approx(np.median(norms), rel=0.02)
    assert window.limit == pytest.approx(10 * window.median_norm)
    assert window.dropped is None  # counted by a complete pass
    got = np.concatenate(list(window.blocks()))
    np.testing.assert_array_equal(got, x[start:][~sink[start:]])
    assert window.dropped == sink[start:].sum() > 0 and window.kept == len(got)
    assert window.report() == {"dropped_tokens": int(sink[start:].sum()),
                               "drop_norm_above": 10.0, "median_norm": window.median_norm}
    ticks = []  # progress counts every row read, dropped ones too
    list(window.blocks(ticks.append))
    assert sum(ticks) == N - start
    for lo, block, mask in window.masked():  # aligned with the token positions
        np.testing.assert_array_equal(block, x[lo:lo + len(block)])
        np.testing.assert_array_equal(mask, ~sink[lo:lo + len(block)])
    everything = Window.dropping(source, start, batch_size=1000, multiple=None)
    assert everything.keep_fn is None and everything.report() == {}
    np.testing.assert_array_equal(np.concatenate(list(everything.blocks())), x[start:])


def test_a_transcoders_rows_are_judged_by_their_inputs():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((64, 6)).astype(np.float32)
    rows[:, 4:] *= 1000  # huge targets: never a reason to leave a row out
    rows[7, :4] *= 50  # one outlier input

    class Paired(ArraySource):
        d_out = 2

        @property
        def d_in(self):
            return 4

    window = Window.dropping(Paired([rows], ["pairs"], 6), 0, multiple=5.0)
    kept = np.concatenate(list(window.blocks()))
    np.testing.assert_array_equal(kept, np.delete(rows, 7, axis=0))


def test_which_multiple_an_evaluation_uses():
    own = [{"jaxsae": {"drop_norm_above": 10.0}}, {"jaxsae": {"drop_norm_above": 4}},
           {"jaxsae": {}}, {"architecture": "standard"}]  # the last: trained elsewhere
    assert drop_multiple(own) == 4.0  # tokens every SAE was trained on
    assert drop_multiple(own, TRAINED) == 4.0
    assert drop_multiple(own[2:]) is None
    assert drop_multiple(own, 7.5) == 7.5 and drop_multiple(own, None) is None
    assert drop_multiple([{"jaxsae": {"drop_norm_above": None}}]) is None
    assert trained_drop(own[0]) == {"drop_norm_above": 10.0} and trained_drop(own[3]) == {}


def test_where_the_training_tokens_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acts").mkdir()
    here = {"dataset_path": str(tmp_path / "acts")}
    saes = [{"metadata": here, "jaxsae": {"held_out_from": 900}},
            {"metadata": here, "jaxsae": {"held_out_from": 1000}},
            {"metadata": {"dataset_path": str(tmp_path / "other")},
             "jaxsae": {"held_out_from": 5000}},  # trained on other data
            {"metadata": here, "jaxsae": {"held_out_from": True}},  # not a count
            {"metadata": here}, {"architecture": "standard"},  # trained elsewhere
            {"metadata": ["not", "a", "dict"], "jaxsae": {"held_out_from": 7}}]
    assert trained_end(saes, "acts") == 1000  # (a relative path to the same directory)
    assert trained_end(saes[2:], tmp_path / "acts") is None
    assert trained_end(saes, tmp_path / "other") == 5000
    assert trained_drop(saes[0]) == {"held_out_from": 900}  # kept by an SAE made from it


@pytest.mark.usefixtures("no_analysis_figures")  # (reads no figure: test_geometry.py does)
def test_reports_count_the_tokens_the_sae_was_trained_on(sinks, tmp_path, capsys):
    """(fault testing: analyze, repair, convert and stitch read the last --tokens of the data,
    which are training tokens on data under ~1.3M tokens, and did not say so.) An SAE that
    records where its training tokens end in its data: the reports count the kept tokens
    before that point, and the commands say so on stderr."""
    held, tokens = 2048, 4096
    trained = int((~sinks["sink"][N - tokens:N - held]).sum())  # kept, before the held-out
    record = {"drop_norm_above": 10.0, "held_out_from": N - held}
    saes = {}
    for name in ("relu", "relu_wide", "topk"):
        loaded = export.load_sae(sinks["saes"][name])
        saes[name] = str(export.export_sae(
            loaded.params, loaded.sae, tmp_path / name, training=record,
            metadata={"dataset_path": str(sinks["data"])}))
    data, flags = str(sinks["data"]), ["--tokens", str(tokens), "--no-progress"]
    note = (f"note: {trained:,} of the tokens {{}} are tokens the SAE was trained on, not held "
            f"out; its held-out tokens are the last {held:,} of {data} (--tokens {held})")
    runs = [(["eval", saes["relu"]], None, "evaluated"),
            (["analyze", saes["relu"]], "summary.json", "analysed"),
            (["repair", saes["relu"]], "repair.json", "evaluated"),
            (["convert", saes["topk"]], "convert.json", "compared"),
            (["stitch", "compare", saes["relu"], saes["relu_wide"]], "summary.json",
             "evaluated")]
    for i, (command, report, what) in enumerate(runs):
        out = [] if report is None else ["--out", str(tmp_path / f"out{i}")]
        assert cli.main([*command, "--data", data, *out, *flags]) == 0, command
        printed = capsys.readouterr()
        got = json.loads(printed.out if report is None
                         else (tmp_path / f"out{i}" / report).read_text())
        assert (got["training_tokens"], got["held_out_tokens"]) == (trained, held), command
        assert note.format(what) in printed.err, (command, printed.err)
    assert f"{trained} of those read are training tokens" in (
        tmp_path / "out2" / "repair.md").read_text()
    assert json.loads((tmp_path / "out2" / "sae" / "cfg.json").read_text())["jaxsae"][
        "held_out_from"] == N - held  # the repaired SAE's evaluations can tell too
    # held-out tokens only: 0 and no note; other data than the SAE's: nothing claimed
    assert cli.main(["eval", saes["relu"], "--data", data, "--tokens", str(held)]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["training_tokens"] == 0 and "note" not in printed.err
    assert cli.main(["eval", saes["relu"], "--data", str(sinks["clean"])]) == 0
    assert "training_tokens" not in json.loads(capsys.readouterr().out)


def test_eval_data_scores_the_tokens_training_kept(sinks, capsys):
    sae = str(sinks["saes"]["relu"])
    assert cli.main(["eval", sae, "--data", str(sinks["data"])]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", sae, "--data", str(sinks["clean"])]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert kept["dropped_tokens"] == sinks["sink"].sum() and kept["drop_norm_above"] == 10.0
    assert clean["dropped_tokens"] == 0  # no token of the clean data is above 10x
    for key in ("l0", "mse", "explained_variance", "dead_fraction", "tokens"):
        assert kept[key] == pytest.approx(clean[key], rel=1e-5, abs=1e-7), key
    assert cli.main(["eval", sae, "--data", str(sinks["data"]), "--all-tokens"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert "dropped_tokens" not in every and every["tokens"] == N
    assert every["explained_variance"] < kept["explained_variance"] - 0.1
    assert cli.main(["eval", sae, "--data", str(sinks["data"]),
                     "--drop-norm-above", "1000"]) == 0
    loose = json.loads(capsys.readouterr().out)
    assert loose["dropped_tokens"] == 0 and loose["mse"] == pytest.approx(every["mse"])


@pytest.mark.parametrize("flags, culprit", [
    (["--all-tokens", "--drop-norm-above", "3"], "--all-tokens and --drop-norm-above"),
    (["--drop-norm-above", "0"], "--drop-norm-above: must be >= 1"),
    (["--drop-norm-above", "-1"], "--drop-norm-above: must be >= 1"),
    (["--drop-norm-above", "0.5"], "--drop-norm-above: must be >= 1 (a multiple of the median "
                                   "norm: below 1 it drops most tokens, not outliers), got 0.5"),
    (["--drop-norm-above", "nan"], "--drop-norm-above: must be >= 1"),
    # (fault testing: reported as "drop_norm_above": null, as if no rule had been given)
    (["--drop-norm-above", "inf"], "--drop-norm-above: inf leaves out no token; pass "
                                   "--all-tokens")])
def test_bad_drop_flags_are_refused(sinks, capsys, flags, culprit):
    assert cli.main(["eval", str(sinks["saes"]["relu"]), "--data", str(sinks["data"]),
                     *flags]) == 2
    assert culprit in capsys.readouterr().err


def test_eval_of_more_tokens_than_the_data_holds_says_so(sinks, capsys):
    """(fault testing: --tokens beyond the data evaluated every token without a word)"""
    sae, data = str(sinks["saes"]["relu"]), str(sinks["data"])
    assert cli.main(["eval", sae, "--data", data, "--all-tokens", "--no-progress"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", sae, "--data", data, "--all-tokens", "--tokens", "10000000",
                     "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] == every["tokens"]
    assert (f"note: --tokens 10,000,000 is more than the {every['tokens']:,} tokens of {data}; "
            "evaluating all of them") in captured.err


def test_eval_model_refuses_the_data_flags(sinks, capsys):
    assert cli.main(["eval", str(sinks["saes"]["relu"]), "--model", "m", "--text", "t",
                     "--all-tokens"]) == 2
    assert "--all-tokens" in capsys.readouterr().err


def test_truth_metrics_leave_out_the_true_codes_of_dropped_tokens(tmp_path):
    _, spec = synthetic.parse_spec({"kind": "hierarchy_small", "tokens": 6000, "seed": 2})
    data = synthetic.write(spec, tmp_path / "h", progress=False)
    truth = synthetic.load_truth(data)
    source = open_source(DataConfig(path=str(data)))
    d = truth.directions
    params = {"W_enc": np.asarray(d.T, np.float32), "W_dec": np.asarray(d, np.float32),
              "b_enc": np.zeros(3, np.float32), "b_dec": np.zeros(d.shape[1], np.float32)}
    cfg = SAEConfig(d_sae=3, activation="relu")
    x = source.read(0, source.n_tokens)
    norms = np.linalg.norm(x, axis=1)
    limit = np.median(norms[norms > 0])

    def keep(rows):
        return np.linalg.norm(rows, axis=1) < limit

    got = evaluate.truth_report(params, cfg, source, truth, batch_size=1000, keep=keep)
    mask = keep(x)
    assert 0.5 < mask.mean() < 0.95
    sums = evaluate.GroundTruthSums(params, cfg, truth.directions,
                                    parent=truth.arrays.get("parent"))
    sums.add(x[mask], jnp.asarray(x[mask]), truth.codes(0, len(x))[mask], None)
    want = sums.result()
    want.pop("per_feature")
    want.pop("per_parent", None)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
    assert got["true_l0"] != pytest.approx(evaluate.truth_report(
        params, cfg, source, truth, batch_size=1000)["true_l0"])  # the filter did something


def _latents(path):
    with open(path / "latents.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.usefixtures("no_analysis_figures")  # (reads no figure: test_geometry.py does)
def test_analyze_and_repair_read_the_kept_tokens(sinks, tmp_path, capsys):
    sae = str(sinks["saes"]["relu"])
    for name in ("data", "clean"):
        assert cli.main(["analyze", sae, "--data", str(sinks[name]), "--out",
                         str(tmp_path / f"a_{name}"), "--no-progress"]) == 0
    capsys.readouterr()
    kept, clean = (json.loads((tmp_path / f"a_{n}" / "summary.json").read_text())
                   for n in ("data", "clean"))
    assert kept["tokens"] == clean["tokens"] == N - sinks["sink"].sum()
    assert kept["dropped_tokens"] == sinks["sink"].sum()
    assert kept["l0"] == pytest.approx(clean["l0"])
    assert kept["kind_fractions"] == clean["kind_fractions"]
    for a, b in zip(_latents(tmp_path / "a_data"), _latents(tmp_path / "a_clean"), strict=True):
        assert a["kind"] == b["kind"]
        assert float(a["firing_frequency"]) == pytest.approx(float(b["firing_frequency"]))
    for name in ("data", "clean"):
        assert cli.main(["repair", sae, "--data", str(sinks[name]), "--out",
                         str(tmp_path / f"r_{name}"), "--no-progress"]) == 0
    kept, clean = (json.loads((tmp_path / f"r_{n}" / "repair.json").read_text())
                   for n in ("data", "clean"))
    assert kept["tokens"] == clean["tokens"] and kept["dropped_tokens"] == sinks["sink"].sum()
    for when in ("before", "after"):
        for key in ("l0", "mse", "explained_variance"):
            assert kept[when][key] == pytest.approx(clean[when][key], rel=1e-5), (when, key)
    assert "tokens left out (norm above 10x the median" in (
        tmp_path / "r_data" / "repair.md").read_text()
    repaired = json.loads((tmp_path / "r_data" / "sae" / "cfg.json").read_text())
    assert repaired["jaxsae"]["drop_norm_above"] == 10.0  # its own evaluations drop them too


def test_convert_calibrates_and_compares_on_the_kept_tokens(sinks, tmp_path, capsys):
    topk = str(sinks["saes"]["topk"])
    tokens = str(N // 2 - 64)
    for name in ("data", "clean"):
        assert cli.main(["convert", topk, "--data", str(sinks[name]), "--out",
                         str(tmp_path / name), "--tokens", tokens]) == 0
    capsys.readouterr()
    kept, clean = (json.loads((tmp_path / n / "convert.json").read_text())
                   for n in ("data", "clean"))
    # the windows differ (the last N tokens of each), so compare with the kept tokens' count
    assert kept["dropped_tokens"] == sinks["sink"][-int(tokens):].sum()
    assert kept["tokens"] == int(tokens) - kept["dropped_tokens"]
    assert kept["calibration_tokens"] == int(tokens) - sinks["sink"][
        -2 * int(tokens):-int(tokens)].sum()
    assert kept["explained_variance_jumprelu"] > 0.5  # (with the sinks: below 0)
    assert kept["recall_of_topk_codes"] == pytest.approx(clean["recall_of_topk_codes"],
                                                         abs=0.02)
    assert json.loads((tmp_path / "data" / "sae" / "cfg.json").read_text())[
        "jaxsae"]["drop_norm_above"] == 10.0


def test_stitch_compare_reads_the_kept_tokens(sinks, tmp_path, capsys):
    small, large = str(sinks["saes"]["relu"]), str(sinks["saes"]["relu_wide"])
    for name in ("data", "clean"):
        assert cli.main(["stitch", "compare", small, large, "--data", str(sinks[name]),
                         "--out", str(tmp_path / name), "--no-progress"]) == 0
    capsys.readouterr()
    kept, clean = (json.loads((tmp_path / n / "summary.json").read_text())
                   for n in ("data", "clean"))
    assert kept.pop("dropped_tokens") == sinks["sink"].sum() and clean.pop("dropped_tokens") == 0
    assert kept.pop("drop_norm_above") == clean.pop("drop_norm_above") == 10.0
    assert kept.pop("median_norm") == pytest.approx(clean.pop("median_norm"), rel=0.02)
    for key, value in clean.items():
        assert kept[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float)
                             else value), key
    assert "tokens left out (norm above 10x" in (tmp_path / "data" / "summary.md").read_text()


def test_frankenstein_retrains_and_evaluates_without_the_sinks(sinks, tmp_path, capsys):
    """... and the stitched SAE, then the one with its decoder retrained (a run from it),
    record where its members' training tokens end in the data: (fault testing: neither
    recorded it, and evaluations on the data the members were trained on said nothing of the
    tokens the encoder had seen)."""
    members = []
    for name, end in (("relu", N - 1000), ("relu_wide", N - 3000)):
        loaded = export.load_sae(sinks["saes"][name])
        members.append(str(export.export_sae(
            loaded.params, loaded.sae, tmp_path / name,
            training={"drop_norm_above": 10.0, "held_out_from": end},
            metadata={"dataset_path": str(sinks["data"])})))
    out = tmp_path / "f"
    assert cli.main(["stitch", "frankenstein", *members, "--data", str(sinks["data"]), "--out",
                     str(out), "--tokens", "4096", "--retrain-decoder-tokens", "2048",
                     "--batch-size", "512", "--no-progress"]) == 0
    capsys.readouterr()
    for sae in ("stitched", "sae"):  # (the retraining alone ends at N - 4096)
        assert json.loads((out / sae / "cfg.json").read_text())["jaxsae"][
            "held_out_from"] == N - 1000, sae
    assert cli.main(["eval", str(out / "sae"), "--data", str(sinks["data"]), "--tokens",
                     "4096"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["training_tokens"], got["held_out_tokens"]) == (
        int((~sinks["sink"][N - 4096:N - 1000]).sum()), 1000)
    dropped = sinks["sink"][-4096:].sum()
    assert (f"Evaluated on the last 4096 tokens of {sinks['data']} ({dropped} tokens left out "
            "(norm above 10x the median") in (out / "frankenstein.md").read_text()
    retrained = json.loads((out / "sae" / "cfg.json").read_text())
    assert retrained["jaxsae"]["drop_norm_above"] == 10.0  # its training left them out too
    assert "drop_norm_above: 10.0" in (out / "retrain" / "config.yaml").read_text()


def test_a_multiple_that_leaves_most_tokens_out_is_refused(sinks, tmp_path, capsys):
    """A multiple below 1 of the median norm leaves out most tokens, not outliers (one that
    left out every token was refused after the pass; fault testing: 0.5 reported on 4 % of
    them): refused before any work, by every command that takes it, as data.drop_norm_above."""
    dense = _write(tmp_path / "dense", np.random.default_rng(6).standard_normal(
        (2048, D_IN)).astype(np.float32) + 3.0)  # no token near norm 0
    for command in (["eval", str(sinks["saes"]["relu"]), "--data", str(dense)],
                    ["analyze", str(sinks["saes"]["relu"]), "--data", str(dense),
                     "--out", str(tmp_path / "a"), "--no-progress"]):
        assert cli.main([*command, "--drop-norm-above", "0.001"]) == 2
        err = capsys.readouterr().err
        assert "--drop-norm-above: must be >= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_eval_notes_outliers_it_scores(sinks, tmp_path, capsys):
    """An SAE whose training left nothing out (here: exported without the multiple) is scored
    on every token; eval says, on stderr, that the data holds tokens far above the median."""
    loaded = export.load_sae(sinks["saes"]["relu"])
    export.export_sae(loaded.params, loaded.sae, tmp_path / "plain")
    assert cli.main(["eval", str(tmp_path / "plain"), "--data", str(sinks["data"])]) == 0
    captured = capsys.readouterr()
    assert "dropped_tokens" not in json.loads(captured.out)
    assert (f"note: {sinks['sink'].sum()} of {N} tokens sampled" in captured.err
            and "--drop-norm-above 10" in captured.err)
    for flags in (["--data", str(sinks["clean"])], ["--data", str(sinks["data"]), "--all-tokens"]):
        assert cli.main(["eval", str(tmp_path / "plain"), *flags, "--no-progress"]) == 0
        assert capsys.readouterr().err == ""


def test_data_mostly_zero_has_no_outliers_and_no_multiple_of_its_median(sinks, tmp_path,
                                                                         capsys):
    """(fault testing: on data whose median norm is 0 the rule left out every non-zero token
    and scored the zeros, and eval's note called the non-zero tokens outliers)"""
    x = sinks["x"][~sinks["sink"]].copy()
    x[np.arange(len(x)) % 3 != 0] = 0.0  # two tokens in three are zero
    sparse = _write(tmp_path / "sparse", x)
    assert cli.main(["eval", str(sinks["saes"]["relu"]), "--data", str(sparse)]) == 2
    err = capsys.readouterr().err
    assert "the median norm of the tokens evaluated is 0" in err and "--all-tokens" in err
    loaded = export.load_sae(sinks["saes"]["relu"])
    export.export_sae(loaded.params, loaded.sae, tmp_path / "plain")  # (drops nothing)
    assert cli.main(["eval", str(tmp_path / "plain"), "--data", str(sparse)]) == 0
    err = capsys.readouterr().err  # the progress line, and no note
    assert "note" not in err and "evaluate: " in err
