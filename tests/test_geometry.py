"""jaxsae analyze: each piece against a brute-force reference, and the whole command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from jaxsae import cli, evaluate
from jaxsae.analysis import geometry
from jaxsae.config import SAEConfig
from jaxsae.data.shards import ShardSet
from jaxsae.export import export_sae, load_sae


def test_cofiring_and_jaccard_match_counting(rng):
    fired = rng.random((300, 12)) < 0.2
    fired[:, 3] = fired[:, 2] & (rng.random(300) < 0.5)  # 3 fires only with 2
    fired[:, 11] = True  # fires everywhere: a parent of everything, by chance alone
    t, j = np.nonzero(fired)
    i_, j_, count, fires = geometry.cofiring(t, j, 300, 12)
    np.testing.assert_array_equal(fires, fired.sum(0))
    got = {(a, b): c for a, b, c in zip(i_, j_, count, strict=True)}
    for a in range(12):
        for b in range(a + 1, 12):
            both = int(np.sum(fired[:, a] & fired[:, b]))
            assert got.get((a, b), 0) == both
    jac = geometry.jaccard(i_, j_, count, fires)
    a, b = i_[0], j_[0]
    assert jac[0] == pytest.approx(np.sum(fired[:, a] & fired[:, b])
                                   / np.sum(fired[:, a] | fired[:, b]))
    pc = geometry.parent_child(i_, j_, count, fires, 300, threshold=0.99, min_count=5)
    assert [(int(p), int(c)) for p, c, *_ in pc] == [(2, 3)]
    assert pc[0][2] == 1.0 and pc[0][4] == pytest.approx(300 / fires[2])
    everywhere = geometry.parent_child(i_, j_, count, fires, 300, threshold=0.99, min_count=5,
                                       min_lift=0.5)
    assert {int(p) for p, *_ in everywhere} == {2, 11}


def test_decoder_neighbours_and_clusters_match_brute_force(rng):
    W = rng.normal(size=(50, 8))
    W[10:13] = W[0] + 0.05 * rng.normal(size=(3, 8))  # a cluster {0, 10, 11, 12}
    W[30] = W[20] + 0.05 * rng.normal(size=8)  # and {20, 30}, across blocks
    idx, cos, labels = geometry.decoder_graph(W, 3, 0.95, block=16)
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    full = unit @ unit.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :3])
    np.testing.assert_allclose(cos, np.sort(full, axis=1)[:, ::-1][:, :3], atol=1e-5)
    assert len({labels[k] for k in (0, 10, 11, 12)}) == 1
    assert np.sum(labels == labels[0]) == 4
    # every label: the connected components of cos > 0.95 by brute force
    from scipy.sparse.csgraph import connected_components
    want = connected_components(full > 0.95, directed=False)[1]
    same = labels[:, None] == labels[None, :]
    np.testing.assert_array_equal(same, want[:, None] == want[None, :])
    assert labels[20] == labels[30] and np.sum(labels == labels[20]) == 2


def test_count_peaks(rng):
    bins = np.arange(32)
    bump = np.exp(-0.5 * ((bins - 20) / 3) ** 2)
    spike = np.exp(-bins / 2.0)
    one = 100 * bump
    two = 100 * spike + 60 * bump  # a spike at 0 beside a bump
    noisy = rng.poisson(200 * spike + 15)  # one decaying mode plus bin-to-bin noise
    empty = np.zeros(32)
    few = np.zeros(32)
    few[30:32] = [18, 2]  # a latent that fired on 20 tokens: one peak (fault testing: none)
    np.testing.assert_array_equal(
        geometry.count_peaks(np.stack([one, two, noisy, empty, few])), [1, 2, 1, 0, 1])


def test_analyze_writes_every_table_plot_and_the_page(small_data, tmp_path, capsys):
    rng = np.random.default_rng(0)
    d_sae, d = 40, 16
    W_dec = rng.normal(size=(d_sae, d)).astype(np.float32)
    W_dec[1] = W_dec[0] + 0.01
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_enc = np.full(d_sae, -0.5, np.float32)
    b_enc[5] = 10.0  # fires on every token
    params = {"W_enc": W_dec.T.copy(), "b_enc": b_enc,
              "W_dec": W_dec, "b_dec": np.zeros(d, np.float32)}
    export_sae(params, SAEConfig(d_sae=d_sae, decoder_norm="free"), tmp_path / "sae")
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(tmp_path / "sae"), "--data", str(small_data), "--out",
                     str(out), "--tokens", "4000", "--cofire-tokens", "1500", "--batch-size",
                     "1024", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nopen ")[0])
    assert summary["tokens"] == 4000 and summary["cofire_tokens"] == 1500
    for name in ("latents.csv", "activation_histograms.csv", "cofiring_pairs.csv",
                 "parent_child.csv", "neighbours.csv", "clusters.csv", "summary.json",
                 "density.png", "activation_histograms.png", "geometry.png", "index.html"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "index.html").read_text()
    assert all(f'src="{png}"' in page for png in ("density.png", "geometry.png",
                                                   "activation_histograms.png"))

    x = np.asarray(ShardSet(small_data).read(16384 - 4000, 16384), np.float32)
    loaded = load_sae(tmp_path / "sae")
    codes = np.asarray(evaluate.encode_decode(loaded.params, x, loaded.sae)[0])
    with open(out / "latents.csv") as f:
        latents = list(csv.DictReader(f))
    with open(out / "activation_histograms.csv") as f:
        hists = list(csv.DictReader(f))
    for k in (0, 7, 39):
        active = codes[:, k][codes[:, k] > 0]
        assert float(latents[k]["firing_frequency"]) == pytest.approx(len(active) / 4000)
        if len(active):  # the statistics of one pass over the tokens, against numpy's
            assert float(latents[k]["max_activation"]) == pytest.approx(active.max(), rel=1e-5)
            assert float(latents[k]["mean_activation"]) == pytest.approx(active.mean(),
                                                                         rel=1e-4)
            want, _ = np.histogram(active, bins=geometry.BINS, range=(0, active.max()))
            got = [int(hists[k][f"bin{b}"]) for b in range(geometry.BINS)]
            assert sum(got) == len(active)
            assert np.abs(np.array(got) - want).sum() <= 2  # bin edges may round differently
    assert int(latents[0]["nearest"]) == 1 and float(latents[0]["nearest_cos"]) > 0.99
    assert latents[0]["cluster"] == latents[1]["cluster"]
    with open(out / "cofiring_pairs.csv") as f:
        pairs = list(csv.DictReader(f))
    dense = {int(r["latent"]) for r in latents if float(r["firing_frequency"]) > 0.3}
    assert 5 in dense
    assert pairs and dense  # dense latents co-fire with everything: not listed
    assert all(int(p["fires_a"]) <= 150 and int(p["fires_b"]) <= 150 for p in pairs)
    assert not dense & {int(p[k]) for p in pairs for k in ("latent_a", "latent_b")}
    assert summary["l0"] == pytest.approx(np.mean((codes > 0).sum(1)), rel=1e-6)
    # how fully a latent's tokens hold its partner's direction: against every token projected
    # on every decoder direction (the definition; analyze sums the inputs per latent instead)
    along = x @ (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)).T  # [tokens, d_sae]
    fired = codes > 0
    with_partner = [k for k in range(d_sae) if int(latents[k]["partner"]) >= 0]
    assert with_partner
    for k in with_partner:
        p = int(latents[k]["partner"])
        want = along[fired[:, k], p].mean() / along[fired[:, p], p].mean()
        assert float(latents[k]["carries_partner"]) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_analyze_refuses_codes_past_float32s_range(small_data, tmp_path, capsys):
    """(fault testing: codes of ~1e20, whose squares overflow float32's sums, wrote an
    activation_cv of inf or nan into latents.csv; tokens of norm 1e18 a ring_cv of inf.)
    Refused in one line naming the sums, with nothing written."""
    rng = np.random.default_rng(0)
    W_dec = rng.normal(size=(40, 16)).astype(np.float32)  # (the shapes of the test above:
    # its compilations are reused)
    export_sae({"W_enc": W_dec.T * np.float32(1e20), "b_enc": np.zeros(40, np.float32),
                "W_dec": W_dec, "b_dec": np.zeros(16, np.float32)},
               SAEConfig(d_sae=40, decoder_norm="free"), tmp_path / "sae")
    argv = ["analyze", str(tmp_path / "sae"), "--data", str(small_data), "--out",
            str(tmp_path / "o"), "--tokens", "1024", "--batch-size", "1024", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "activations_squared" in err and "too large to analyse" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_run_s_curves_are_found_however_the_sae_is_named(tmp_path, monkeypatch):
    """(fault testing: `jaxsae analyze . ...` run inside runs/NAME/sae looked for ./curves.png
    beside `.`, and the page lost the run's training curves.) Found from the SAE's own path,
    relative, `.` or through a link, as from runs/NAME/sae."""
    run = tmp_path / "runs" / "a"
    (run / "sae").mkdir(parents=True)
    (run / "curves.png").write_bytes(b"png")
    (tmp_path / "link").symlink_to(run / "sae")
    monkeypatch.chdir(run / "sae")
    for given in (".", "../sae", str(tmp_path / "link"), str(run / "sae")):
        found = geometry._training_curves(Path(given))
        assert found is not None and found.samefile(run / "curves.png"), given
