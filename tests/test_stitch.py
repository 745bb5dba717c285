"""jaxsae stitch: the batched MSE changes against inserting / swapping latents one at a time,
and Frankenstein SAEs whose codes are their members' codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from jaxsae import cli, evaluate
from jaxsae.analysis import stitch
from jaxsae.config import SAEConfig
from jaxsae.data.shards import ShardSet
from jaxsae.errors import JaxsaeError
from jaxsae.export import export_sae, load_sae

D = 16


def random_sae(path, d_sae, rng, *, activation="relu", k=4, parents=None, **extra):
    """A random SAE; `parents` (a small SAE's W_dec) seeds its first rows with perturbed copies
    (reconstruction latents) and its first latents' encoders alike."""
    W_dec = rng.normal(size=(d_sae, D)).astype(np.float32)
    if parents is not None:
        n = len(parents)
        W_dec[: 2 * n] = np.repeat(parents, 2, 0) + 0.1 * rng.normal(size=(2 * n, D))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {"W_enc": (W_dec.T * 0.8).astype(np.float32),
              "b_enc": rng.normal(scale=0.1, size=d_sae).astype(np.float32) - 0.2,
              "W_dec": W_dec, "b_dec": rng.normal(scale=0.05, size=D).astype(np.float32),
              **extra}
    cfg = SAEConfig(d_sae=d_sae, activation=activation, k=k, decoder_norm="free")
    export_sae(params, cfg, path)
    return load_sae(path)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def mse(params, cfg, x):
    return float(np.mean(np.sum((np.asarray(evaluate.encode_decode(params, x, cfg)[1]) - x) ** 2,
                                1)))


@pytest.fixture
def family(small_data, tmp_path):
    rng = np.random.default_rng(1)
    small = random_sae(tmp_path / "small", 12, rng)
    large = random_sae(tmp_path / "large", 40, rng, parents=small.params["W_dec"][:5])
    return small, large


def test_compare_matches_inserting_and_swapping_one_at_a_time(family, small_data, tmp_path):
    small, large = family
    summary = stitch.compare(str(tmp_path / "small"), str(tmp_path / "large"), str(small_data),
                             tmp_path / "out", tokens=3000, batch_size=1024, progress=False)
    x = np.asarray(ShardSet(small_data).read(16384 - 3000, 16384), np.float32)
    f_s = np.asarray(evaluate.encode_decode(small.params, x, small.sae)[0])
    f_l = np.asarray(evaluate.encode_decode(large.params, x, large.sae)[0])
    x_hat = f_s @ small.params["W_dec"] + small.params["b_dec"]
    base = np.mean(np.sum((x - x_hat) ** 2, 1))
    assert summary["small_mse"] == pytest.approx(base, rel=1e-4)

    rows = read_csv(tmp_path / "out" / "stitch.csv")
    assert len(rows) == 40
    unit_l = stitch.unit_rows(large.params["W_dec"])
    unit_s = stitch.unit_rows(small.params["W_dec"])
    for j, row in enumerate(rows):
        inserted = x_hat + np.outer(f_l[:, j], large.params["W_dec"][j])
        want = np.mean(np.sum((x - inserted) ** 2, 1)) - base
        assert float(row["delta_mse"]) == pytest.approx(want, rel=1e-3, abs=1e-6), j
        cos = unit_s @ unit_l[j]
        assert float(row["max_cos"]) == pytest.approx(cos.max(), abs=1e-5)
        assert row["kind"] == ("novel" if cos.max() <= 0.7 else "reconstruction")
    assert summary["reconstruction"] >= 5 and summary["novel"] >= 20

    comps = read_csv(tmp_path / "out" / "components.csv")
    assert len(comps) == summary["components"] >= 3
    for c in comps:
        s_m = [int(v) for v in c["small_latents"].split(";")]
        l_m = [int(v) for v in c["large_latents"].split(";")]
        swapped = (x_hat - f_s[:, s_m] @ small.params["W_dec"][s_m]
                   + f_l[:, l_m] @ large.params["W_dec"][l_m])
        want = np.mean(np.sum((x - swapped) ** 2, 1)) - base
        assert float(c["delta_mse"]) == pytest.approx(want, rel=1e-3, abs=1e-6)
        want_l0 = np.mean((f_l[:, l_m] > 0).sum(1) - (f_s[:, s_m] > 0).sum(1))
        assert float(c["delta_l0"]) == pytest.approx(want_l0, abs=1e-6)
        # every edge of the component is a reconstruction pair
        for j in l_m:
            assert rows[j]["kind"] == "reconstruction" and int(rows[j]["component"]) == int(
                c["component"])
    for name in ("summary.md", "summary.json", "max_cos_hist.png", "delta_mse_vs_max_cos.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    counts = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sum(counts[f"mse_{k}_{s}"] for k in ("novel", "reconstruction")
               for s in ("lower", "higher", "unchanged")) == 40


def test_compare_with_a_topk_large_sae_uses_its_real_codes(small_data, tmp_path):
    rng = np.random.default_rng(2)
    small = random_sae(tmp_path / "small", 8, rng)
    large = random_sae(tmp_path / "large", 32, rng, activation="topk", k=3,
                       parents=small.params["W_dec"][:4])
    stitch.compare(str(tmp_path / "small"), str(tmp_path / "large"), str(small_data),
                   tmp_path / "out", tokens=1000, progress=False)
    x = np.asarray(ShardSet(small_data).read(16384 - 1000, 16384), np.float32)
    f_l = np.asarray(evaluate.encode_decode(large.params, x, large.sae)[0])
    assert np.all((f_l > 0).sum(1) <= 3)
    x_hat = np.asarray(evaluate.encode_decode(small.params, x, small.sae)[1])
    rows = read_csv(tmp_path / "out" / "stitch.csv")
    for j in (0, 5, 31):
        inserted = x_hat + np.outer(f_l[:, j], large.params["W_dec"][j])
        want = np.mean(np.sum((x - inserted) ** 2, 1)) - np.mean(np.sum((x - x_hat) ** 2, 1))
        assert float(rows[j]["delta_mse"]) == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_stitched_codes_are_the_members_codes(small_data, tmp_path):
    rng = np.random.default_rng(3)
    a = random_sae(tmp_path / "a", 8, rng)
    b = random_sae(tmp_path / "b", 16, rng, parents=a.params["W_dec"][:3])
    c = random_sae(tmp_path / "c", 24, rng, activation="jumprelu",
                   threshold=np.full(24, 0.05, np.float32))
    params, cfg, gave = stitch.stitch_family([c, a, b], threshold=0.7)
    assert cfg.activation == "jumprelu" and gave[0] == {"d_sae": 8, "added": 8}
    x = np.asarray(ShardSet(small_data).read(0, 500), np.float32)
    codes = np.asarray(evaluate.encode_decode(params, x, cfg)[0])
    want, included = [np.asarray(evaluate.encode_decode(a.params, x, a.sae)[0])], \
        [a.params["W_dec"]]
    for member in (b, c):
        best, _ = stitch.max_cosine(member.params["W_dec"], np.concatenate(included))
        keep = best < 0.7
        want.append(np.asarray(evaluate.encode_decode(member.params, x, member.sae)[0])[:, keep])
        included.append(member.params["W_dec"][keep])
    np.testing.assert_allclose(codes, np.concatenate(want, 1), atol=1e-5)
    assert cfg.d_sae == sum(g["added"] for g in gave) == codes.shape[1]
    assert gave[1]["added"] < 16  # b's copies of a's latents were left out
    with pytest.raises(stitch.JaxsaeError, match="ReLU or JumpReLU"):
        stitch.stitch_family([a, random_sae(tmp_path / "t", 8, rng, activation="topk")])


def test_frankenstein_retrains_only_the_decoder(small_data, tmp_path, capsys):
    rng = np.random.default_rng(4)
    random_sae(tmp_path / "a", 12, rng)
    random_sae(tmp_path / "b", 24, rng)
    # the base's own figures (fault testing: copied into the stitched SAE's cfg.json)
    cfg_json = json.loads((tmp_path / "a" / "cfg.json").read_text())
    cfg_json.setdefault("metadata", {}).update(
        {"eval_l0": 3.5, "eval_explained_variance": 0.5, "training_tokens": 1000,
         "hook_name": "blocks.0.hook_resid_post"})
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg_json))
    out = tmp_path / "frank"
    assert cli.main(["stitch", "frankenstein", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--data", str(small_data), "--out", str(out), "--tokens", "2048",
                     "--batch-size", "256", "--retrain-decoder-tokens", "8192",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Frankenstein SAE" in printed
    stitched, final = load_sae(out / "stitched"), load_sae(out / "sae")
    metadata = stitched.cfg_json["metadata"]
    assert metadata["hook_name"] == "blocks.0.hook_resid_post"
    assert not {"eval_l0", "eval_explained_variance", "training_tokens"} & set(metadata)
    for name in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_array_equal(final.params[name], stitched.params[name])
    assert not np.allclose(final.params["W_dec"], stitched.params["W_dec"])
    rows = read_csv(out / "frankenstein.csv")
    by = {r["sae"]: r for r in rows}
    before = float(by["frankenstein (stitched)"]["mse"])
    after = float(by["frankenstein (decoder retrained)"]["mse"])
    assert after < before
    assert by["frankenstein (stitched)"]["l0"] == by["frankenstein (decoder retrained)"]["l0"]
    x = np.asarray(ShardSet(small_data).read(16384 - 2048, 16384), np.float32)
    assert after == pytest.approx(mse(final.params, final.sae, x), rel=1e-4)
    # (fault testing: the same SAE given twice was stitched onto itself)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert cli.main(["stitch", "frankenstein", str(tmp_path / "a"), str(tmp_path / "link"),
                     "--data", str(small_data), "--out", str(tmp_path / "f1")]) == 2
    assert f"SAE {tmp_path / 'link'}: given twice (as {tmp_path / 'a'})" in capsys.readouterr(
        ).err
    # retraining on what --tokens leaves: its errors name this command's flags
    assert cli.main(["stitch", "frankenstein", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--data", str(small_data), "--out", str(tmp_path / "f2"), "--tokens",
                     "16384", "--retrain-decoder-tokens", "8192", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "--batch-size" in err and "optim." not in err, err
    # (fault testing: a bad --lr was found after the stitching, leaving OUT.partial behind)
    assert cli.main(["stitch", "frankenstein", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--data", str(small_data), "--out", str(tmp_path / "f3"), "--lr", "0",
                     "--no-progress"]) == 2
    assert "--lr: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "f3.partial").exists() and not (tmp_path / "f3").exists()


def test_frankenstein_resumes_only_the_same_stitched_sae(small_data, tmp_path, monkeypatch):
    """An interrupted retraining is continued by the same call, but not once a member SAE
    changed (fault testing: the retraining resumed, and a decoder retrained for the old
    member's encoder was published beside the new stitched SAE)."""
    from safetensors.numpy import load_file, save_file

    from jaxsae import train as train_mod
    from jaxsae.outputs import OutputError

    rng = np.random.default_rng(6)
    random_sae(tmp_path / "a", 8, rng)
    random_sae(tmp_path / "b", 16, rng)
    resumed = []

    def interrupted(cfg, **kwargs):
        checkpoints = Path(cfg.run_dir) / "checkpoints"
        resumed.append(checkpoints.exists())
        checkpoints.mkdir(parents=True, exist_ok=True)
        raise OutputError("interrupted")

    monkeypatch.setattr(train_mod, "train", interrupted)

    def call():
        with pytest.raises(OutputError, match="interrupted"):
            stitch.frankenstein([str(tmp_path / "a"), str(tmp_path / "b")], str(small_data),
                                tmp_path / "frank", tokens=2048, batch_size=256,
                                retrain_decoder_tokens=4096, progress=False)

    call()
    call()
    weights = tmp_path / "b" / "sae_weights.safetensors"
    changed = load_file(weights)
    changed["W_enc"] = changed["W_enc"] * 2
    save_file(changed, weights)
    call()
    assert resumed == [False, True, False]


def test_frankenstein_on_too_few_tokens_to_hold_out(small_data, tmp_path, capsys):
    """(fault testing: 19 tokens, whose 5 % rounds to none, ended in a traceback and left
    OUT.partial behind)"""
    from jaxsae.data.shards import ShardWriter

    rng = np.random.default_rng(7)
    random_sae(tmp_path / "a", 8, rng)
    random_sae(tmp_path / "b", 16, rng)
    few = tmp_path / "few"
    with ShardWriter(few, d_in=D, dtype="float32") as w:
        w.write(np.asarray(ShardSet(small_data).read(0, 19), np.float32))
    assert cli.main(["stitch", "frankenstein", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--data", str(few), "--out", str(tmp_path / "f"),
                     "--retrain-decoder-tokens", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{few}: 19 tokens, too few to hold out 5 % of them" in err and "give --tokens" in err
    assert not (tmp_path / "f.partial").exists() and not (tmp_path / "f").exists()


def test_stitch_bad_input(small_data, tmp_path, capsys):
    rng = np.random.default_rng(5)
    random_sae(tmp_path / "a", 8, rng)

    def error(*argv):
        assert cli.main(["stitch", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "--threshold" in error("compare", str(tmp_path / "a"), str(tmp_path / "a"),
                                  "--data", str(small_data), "--out", str(tmp_path / "o"),
                                  "--threshold", "1.5")
    assert "nope: does not exist" in error("compare", str(tmp_path / "a"), str(tmp_path / "nope"),
                                           "--data", str(small_data), "--out", str(tmp_path / "o"))
    (tmp_path / "afile").write_text("x")
    assert "afile: not a directory" in error("compare", str(tmp_path / "a"),
                                             str(tmp_path / "afile"), "--data", str(small_data),
                                             "--out", str(tmp_path / "o"))
    other = tmp_path / "wide"
    params = {"W_enc": np.zeros((D + 1, 4), np.float32), "b_enc": np.zeros(4, np.float32),
              "W_dec": np.ones((4, D + 1), np.float32), "b_dec": np.zeros(D + 1, np.float32)}
    export_sae(params, SAEConfig(d_sae=4, decoder_norm="free"), other)
    assert "different d_in" in error("compare", str(tmp_path / "a"), str(other), "--data",
                                     str(small_data), "--out", str(tmp_path / "o"))
    random_sae(tmp_path / "b", 16, rng)  # SMALL and LARGE given the wrong way round
    assert "give the narrower SAE first" in error(
        "compare", str(tmp_path / "b"), str(tmp_path / "a"), "--data", str(small_data),
        "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_swapping_in_an_identical_latent_changes_nothing(small_data, tmp_path):
    """A large SAE holding exact copies of the small one's latents (as a Frankenstein SAE does
    of its base): each copy's component swaps a latent for itself, a change that is float32
    rounding of either sign unless it is read as none."""
    rng = np.random.default_rng(3)
    small = random_sae(tmp_path / "small", 12, rng)
    wide = {k: np.concatenate([small.params[k], rng.normal(size=small.params[k].shape)
                               .astype(np.float32)], axis=0 if k == "W_dec" else -1)
            for k in ("W_dec", "W_enc", "b_enc")}
    export_sae({**wide, "b_dec": small.params["b_dec"]},
               SAEConfig(d_sae=24, activation="relu", decoder_norm="free"), tmp_path / "large")
    summary = stitch.compare(str(tmp_path / "small"), str(tmp_path / "large"),
                             str(small_data), tmp_path / "out", tokens=3000, batch_size=1024,
                             progress=False)
    comps = read_csv(tmp_path / "out" / "components.csv")
    copies = [c for c in comps if c["small_latents"] == c["large_latents"]
              and c["n_small"] == c["n_large"] == "1"]
    assert len(copies) == 12
    assert all(float(c["delta_mse"]) == 0.0 for c in copies)
    assert summary["components_lower_mse"] == sum(float(c["delta_mse"]) < 0 for c in comps)
    assert summary["components_lower_mse"] <= len(comps) - 12


def test_compare_with_no_pair_above_the_threshold(small_data, tmp_path):
    """(fault testing: two unrelated SAEs at --threshold 0.99 crashed with a traceback)"""
    rng = np.random.default_rng(4)
    random_sae(tmp_path / "small", 6, rng)
    random_sae(tmp_path / "large", 10, rng)
    summary = stitch.compare(str(tmp_path / "small"), str(tmp_path / "large"),
                             str(small_data), tmp_path / "out", tokens=1000, threshold=0.99,
                             progress=False)
    assert read_csv(tmp_path / "out" / "components.csv") == []
    rows = read_csv(tmp_path / "out" / "stitch.csv")
    assert len(rows) == 10 and all(r["kind"] == "novel" for r in rows)
    assert summary["components_lower_mse"] == 0


def test_latents_that_fire_and_change_nothing_are_not_counted_as_never_firing(small_data,
                                                                              tmp_path):
    """(fault testing: a large SAE whose decoder rows were all zero had all its latents
    reported under "never fires", though stitch.csv showed them firing)"""
    rng = np.random.default_rng(4)
    random_sae(tmp_path / "small", 6, rng)
    large = random_sae(tmp_path / "large", 10, rng)
    params = {**large.params, "W_dec": np.zeros_like(large.params["W_dec"])}
    params["b_enc"] = params["b_enc"].copy()
    params["b_enc"][0] = -1e3  # latent 0 never fires
    export_sae(params, large.sae, tmp_path / "zeroed")
    summary = stitch.compare(str(tmp_path / "small"), str(tmp_path / "zeroed"),
                             str(small_data), tmp_path / "out", tokens=1000, progress=False)
    rows = read_csv(tmp_path / "out" / "stitch.csv")
    firing = [float(r["firing_frequency"]) > 0 for r in rows]
    assert not firing[0] and sum(firing) >= 5
    assert summary["mse_novel_unchanged"] + summary["mse_reconstruction_unchanged"] == 10
    assert summary["novel_never_fire"] + summary["reconstruction_never_fire"] == 1
    assert "of which never fire" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (the cosines)
def test_compare_refuses_sums_past_float32s_range(small_data, tmp_path):
    """Squared errors past float32's range (a reconstruction 1e20 too large) are refused in
    one line, nothing written (fault testing: the changes read inf and nan in stitch.csv)."""
    rng = np.random.default_rng(5)
    small = random_sae(tmp_path / "small", 6, rng)
    random_sae(tmp_path / "large", 10, rng)
    export_sae({**small.params, "W_dec": small.params["W_dec"] * np.float32(1e20)},
               SAEConfig(d_sae=6, activation="relu", decoder_norm="free"), tmp_path / "huge")
    with pytest.raises(JaxsaeError, match=r"block sums sse.* pass float32's range .* largest "
                                          r"token norm"):
        stitch.compare(str(tmp_path / "huge"), str(tmp_path / "large"), str(small_data),
                       tmp_path / "out", tokens=1000, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_cosine_histogram_counts_every_latent(tmp_path, monkeypatch):
    """(fault testing: a large SAE holding copies of the small one's latents, as a Frankenstein
    SAE holds its base's, has max cosines of 1.0000001 in float32 rounding, and those latents
    fell outside the histogram's range [.., 1.0]: 10 of 32 were missing from max_cos_hist.png.)
    Every latent of the large SAE is counted in it."""
    figures = []
    monkeypatch.setattr(stitch, "save_figure", lambda fig, path: figures.append(fig))
    cos = [1.0000001192092896, 0.9999999, 1.0000001192092896, 0.5, -0.1]
    stitch._compare_plots([{"max_cos": c, "delta_mse": 0.0} for c in cos], 0.7, tmp_path)
    bars = figures[0].axes[0].patches
    assert sum(bar.get_height() for bar in bars) == len(cos)
