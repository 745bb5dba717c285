"""Stitching SAEs of different widths (`jaxsae stitch compare | frankenstein`).

A large SAE's latent j is compared with a small SAE trained on the same activations by its
decoder direction: m_j = max_i cos(d_j, d_i) over the small SAE's latents. Latents with
m_j <= threshold (0.7) are *novel* (a direction the small SAE lacks), the others
*reconstruction* latents (finer versions of small latents). Reconstruction latents and their
small parents (cos > threshold) form a bipartite parent -> children graph.

Inserting latent j into the small SAE, with the activation f_j the large SAE gives it, changes
the small SAE's squared error per token from ||r||^2 (r = x - x_hat_small) to ||r - f_j d_j||^2:

    dMSE_j = E[f_j^2] ||d_j||^2 - 2 E[f_j (r . d_j)]

computed for every latent at once from E[f^2] and the matrix product r D^T. Swapping a
connected component of the graph (its small latents S out, its large latents L in) changes the
reconstruction by u = sum_L f_j d_j - sum_S f_i d_i, so

    dMSE_C = E[||u||^2] - 2 E[r . u],   dL0_C = sum_L P(f_j > 0) - sum_S P(f_i > 0)

with ||u||^2 from each component's Gram matrix of decoder rows. MSE is the mean over tokens of
the squared error summed over d_in (as in training).

A Frankenstein SAE starts from the smallest SAE of a family and adds, from each larger one in
order of width, its latents whose decoder cosine to everything already included is below the
threshold; each added latent keeps its encoder (its bias corrected for the base SAE's b_dec),
so the codes of ReLU / JumpReLU latents are unchanged. Only the decoder is then retrained
(`freeze: [W_enc, b_enc, b_dec, threshold]` in an ordinary `jaxsae train` run).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import checkpoint, evaluate, export, hub, outputs
from jaxsae.config import DataConfig, SAEConfig
from jaxsae.data import column_of, open_for_saes
from jaxsae.data.source import ArraySource
from jaxsae.data.window import TRAINED, DropRule, Window, describe, trained_end
from jaxsae.errors import JaxsaeError, NonFiniteError, refuse_past_float32
from jaxsae.outputs import (
    atomic_write,
    json_text,
    markdown_table,
    save_figure,
    subplots,
    write_csv,
)
from jaxsae.progress import Progress

THRESHOLD = 0.7


def unit_rows(W: np.ndarray) -> np.ndarray:
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def max_cosine(W_query: np.ndarray, W_ref: np.ndarray, *, threshold: float | None = None,
               block: int = 4096):
    """Per row of W_query, the max cosine to W_ref's rows and its index; with `threshold`, also
    the (query, ref, cos) pairs above it. Blockwise, so [n_query, n_ref] is never held whole."""
    ref = jnp.asarray(unit_rows(W_ref))
    best, arg, pairs = [], [], []
    for start in range(0, len(W_query), block):
        cos = np.asarray(jnp.asarray(unit_rows(W_query[start : start + block])) @ ref.T)
        best.append(cos.max(1))
        arg.append(cos.argmax(1))
        if threshold is not None:
            q, r = np.nonzero(cos > threshold)
            pairs.append(np.stack([q + start, r, cos[q, r]], 1))
    out = np.concatenate(best), np.concatenate(arg)
    if threshold is None:
        return out
    return (*out, np.concatenate(pairs) if pairs else np.zeros((0, 3)))


_FLAGS = {"data.eval_tokens": "--tokens", "optim.batch_size": "--batch-size",
          "optim.total_tokens": "--retrain-decoder-tokens", "optim.lr": "--lr"}


def _as_flags(message: str) -> str:
    """An error of the decoder's retraining, its config keys named as the flags they came
    from (and without advice to set a key this command has no flag for)."""
    for key, flag in _FLAGS.items():
        message = message.replace(key, flag)
    return message.replace(", or set optim.skip_nonfinite: true to skip the steps such tokens "
                           "reach", "")


def _eval_window(source: ArraySource, data: str, saes: Sequence[export.LoadedSAE], tokens: int,
                 batch_size: int, drop_norm_above: DropRule) -> Window:
    """The last `tokens` activations of `source` (`data`; held out when the runs held them
    out), without the tokens `drop_norm_above` leaves out (by default: any of the SAEs'
    training did)."""
    return Window.for_saes(source, data, max(0, source.n_tokens - tokens),
                           saes=[s.cfg_json for s in saes], rule=drop_norm_above,
                           batch_size=batch_size)


CONVERSION_COLUMNS = ["sae", "l0_topk", "l0_jumprelu", "recall_of_topk_codes", "precision",
                      "explained_variance_topk", "explained_variance_jumprelu"]


def _as_per_latent(saes, sae_dirs, window: Window
                   ) -> tuple[list[export.LoadedSAE], list[dict[str, Any]]]:
    """The family with each TopK SAE as a JumpReLU SAE (`jaxsae.analysis.convert`),
    calibrated on up to as many tokens before the evaluation `window` as it holds, and what
    each conversion changed, measured on the evaluation tokens."""
    from jaxsae.analysis import convert

    out, report = [], []
    start = window.start
    lo = max(0, start - window.tokens)
    calibration = None  # (its median is sampled only if some SAE is converted)
    for path, loaded in zip(sae_dirs, saes, strict=True):
        if loaded.sae.activation != "topk":
            out.append(loaded)
            continue
        if start - lo <= 0:
            raise JaxsaeError(f"{path}: a TopK SAE is converted to JumpReLU on tokens before "
                              "the evaluation window, and --tokens leaves none; lower it")
        if calibration is None:
            calibration = Window.dropping(window.source, lo, start,
                                          batch_size=window.batch_size, multiple=window.multiple)
        threshold = convert.calibrate(loaded.params, loaded.sae, calibration.blocks)
        params, cfg = convert.as_jumprelu(loaded, threshold)
        report.append({"sae": str(Path(path).absolute()), "calibration_tokens": calibration.kept,
                       **convert.compare(loaded, params, cfg, window.blocks())})
        out.append(dataclasses.replace(loaded, params=params, sae=cfg, cfg_json={
            **loaded.cfg_json, "architecture": "jumprelu"}))
    return out, report


def _load_family(paths: Sequence[str]) -> list[export.LoadedSAE]:
    saes = [export.load_sae(p) for p in paths]
    d_in = {s.d_in for s in saes}
    if len(d_in) > 1:
        raise JaxsaeError(f"the SAEs have different d_in ({', '.join(map(str, sorted(d_in)))}): "
                          "they must be trained on the same activations")
    return saes


# ---------------------------------------------------------------------------------------------
# compare


@dataclasses.dataclass(frozen=True)
class _Bucket:
    """Components of similar size, padded to `size` members (index n_all = a zero latent)."""
    ids: np.ndarray      # [n_comp] component ids
    members: np.ndarray  # [n_comp, size] indices into the small ++ large latents
    signs: np.ndarray    # [n_comp, size] -1 small (removed), +1 large (inserted), 0 padding
    gram: np.ndarray     # [n_comp, size, size] decoder-row Gram matrices


def _buckets(components: list[np.ndarray], n_small: int, D_all: np.ndarray) -> list[_Bucket]:
    by_size: dict[int, list[int]] = {}
    for c, members in enumerate(components):
        by_size.setdefault(1 << int(np.ceil(np.log2(len(members)))), []).append(c)
    pad = len(D_all)
    D_pad = np.concatenate([D_all, np.zeros((1, D_all.shape[1]), D_all.dtype)])
    out = []
    for size, ids in sorted(by_size.items()):
        members = np.full((len(ids), size), pad)
        for row, c in enumerate(ids):
            members[row, : len(components[c])] = components[c]
        signs = np.where(members == pad, 0.0, np.where(members < n_small, -1.0, 1.0))
        rows = D_pad[members]
        out.append(_Bucket(np.asarray(ids), members, signs.astype(np.float32),
                           np.einsum("cmd,cnd->cmn", rows, rows).astype(np.float32)))
    return out


@partial(jax.jit, static_argnames=("small_cfg", "large_cfg"))
def _compare_block(small, large, x, buckets, small_cfg: SAEConfig, large_cfg: SAEConfig):
    f_s, x_hat = evaluate.encode_decode(small, x, small_cfg)
    f_l = evaluate.encode_decode(large, x, large_cfg)[0]
    r = x - x_hat
    rd_l = r @ large["W_dec"].T
    out = {
        "sse": jnp.sum(r * r),
        "f2_large": jnp.sum(f_l * f_l, 0),
        "cross_large": jnp.sum(f_l * rd_l, 0),
        "cross_large_abs": jnp.sum(jnp.abs(f_l * rd_l), 0),
        "fires_large": jnp.sum(f_l > 0, 0),
        "fires_small": jnp.sum(f_s > 0, 0),
    }
    if buckets:
        f_all = jnp.concatenate([f_s, f_l, jnp.zeros((len(x), 1), x.dtype)], 1)
        rd_all = jnp.concatenate([r @ small["W_dec"].T, rd_l, jnp.zeros((len(x), 1), x.dtype)], 1)
        swaps, scales = [], []
        for members, signs, gram in buckets:
            g = f_all[:, members] * signs                       # [T, c, m]: s_j f_j
            u_sq = jnp.einsum("tcm,cmn,tcn->c", g, gram, g)     # sum_t ||u||^2
            r_u = jnp.sum(g * rd_all[:, members], (0, 2))       # sum_t r . u
            swaps.append(u_sq - 2 * r_u)
            # the size of the terms that difference is of (its rounding error scales with it)
            g_abs = jnp.abs(g)
            scales.append(jnp.einsum("tcm,cmn,tcn->c", g_abs, jnp.abs(gram), g_abs)
                          + 2 * jnp.sum(jnp.abs(g * rd_all[:, members]), (0, 2)))
        out["swap_dsse"] = jnp.concatenate(swaps)
        out["swap_scale"] = jnp.concatenate(scales)
    return out


def compare(small_dir: str, large_dir: str, data: str, out: str | Path, *,
            threshold: float = THRESHOLD, tokens: int = 65536, batch_size: int = 4096,
            hook: str | None = None, progress: bool = True,
            overwrite: bool = False, drop_norm_above: DropRule = TRAINED) -> dict[str, Any]:
    """Writes stitch.csv, components.csv, summary.json / summary.md and two plots to `out`
    (staged, then renamed into place; see `outputs.check_target`); returns the summary.
    `drop_norm_above`: the tokens left out (`jaxsae.data.window.drop_multiple`; by default
    those either SAE's training left out)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    inputs = (small_dir, large_dir, data)
    outputs.check_target(out, "stitch-compare", overwrite=overwrite, inputs=inputs)
    small, large = _load_family([small_dir, large_dir])
    n_s, n_l = small.params["W_dec"].shape[0], large.params["W_dec"].shape[0]
    if n_l < n_s:
        raise JaxsaeError(f"{large_dir}: LARGE has {n_l} latents, fewer than SMALL's {n_s} "
                          f"({small_dir}); give the narrower SAE first")
    source = open_for_saes(data, hook, [small, large], whose="the SAEs'")
    window = _eval_window(source, data, [small, large], tokens, batch_size, drop_norm_above)
    best, arg, pairs = max_cosine(large.params["W_dec"], small.params["W_dec"],
                                  threshold=threshold)
    novel = best <= threshold

    # Components of the parent -> children graph (nodes: small 0..n_s-1, large n_s..).
    q, r = pairs[:, 0].astype(int), pairs[:, 1].astype(int)
    graph = coo_matrix((np.ones(len(q)), (r, q + n_s)), shape=(n_s + n_l,) * 2)
    _, labels = connected_components(graph, directed=False)
    in_graph = np.zeros(n_s + n_l, bool)
    in_graph[r], in_graph[q + n_s] = True, True
    roots = np.unique(labels[in_graph])
    components = [np.nonzero((labels == c) & in_graph)[0] for c in roots]
    component_of = np.full(n_s + n_l, -1)
    for c, members in enumerate(components):
        component_of[members] = c
    D_all = np.concatenate([small.params["W_dec"], large.params["W_dec"]])
    buckets = _buckets(components, n_s, D_all)
    device_buckets = tuple((jnp.asarray(b.members), jnp.asarray(b.signs), jnp.asarray(b.gram))
                           for b in buckets)

    sums: dict[str, Any] = {}
    n, peak = 0, 0.0
    small_p = jax.tree.map(jnp.asarray, small.params)
    large_p = jax.tree.map(jnp.asarray, large.params)
    bar = Progress(window.tokens, unit="tok", unit_scale=True, enabled=progress,
                   desc="stitch compare")
    for x in window.blocks(bar.update):
        s = jax.device_get(_compare_block(small_p, large_p, jnp.asarray(x, jnp.float32),
                                          device_buckets, small.sae, large.sae))
        with np.errstate(invalid="ignore", over="ignore"):  # (inf - inf: refused below, in
            # one line; fault testing: numpy's warning came first, two lines more)
            for k, v in s.items():
                sums[k] = np.asarray(v, np.float64) + sums.get(k, 0)
        n += len(x)
        peak = max(peak, float(np.max(np.linalg.norm(np.asarray(x, np.float64), axis=1))))
    bar.close()
    # (fault testing: tokens of norm ~1e19 gave inf and nan changes, written)
    refuse_past_float32(sums, data, "the tokens or the SAEs' decoders are too large to compare",
                        out=out, peak=peak)

    norms_sq = np.sum(large.params["W_dec"].astype(np.float64) ** 2, 1)
    delta = _beyond_rounding(sums["f2_large"] * norms_sq - 2 * sums["cross_large"],
                             sums["f2_large"] * norms_sq + 2 * sums["cross_large_abs"]) / n
    base_mse = float(sums["sse"]) / n
    freq_s, freq_l = sums["fires_small"] / n, sums["fires_large"] / n
    rows = [{"latent": j, "max_cos": float(best[j]), "best_small": int(arg[j]),
             "kind": "novel" if novel[j] else "reconstruction", "delta_mse": float(delta[j]),
             "delta_mse_relative": float(delta[j] / base_mse),
             "firing_frequency": float(freq_l[j]), "component": int(component_of[n_s + j])}
            for j in range(n_l)]
    swap = np.zeros(len(components))
    if buckets:  # (none when no pair of latents reaches the threshold)
        cuts = np.cumsum([len(b.ids) for b in buckets])[:-1]
        for b, dsse, scale in zip(buckets, np.split(sums["swap_dsse"], cuts),
                                  np.split(sums["swap_scale"], cuts), strict=True):
            swap[b.ids] = _beyond_rounding(dsse, scale) / n
    comp_rows = []
    for c, members in enumerate(components):
        s_m, l_m = members[members < n_s], members[members >= n_s] - n_s
        comp_rows.append({
            "component": c, "small_latents": ";".join(map(str, s_m)),
            "large_latents": ";".join(map(str, l_m)), "n_small": len(s_m), "n_large": len(l_m),
            "delta_mse": float(swap[c]), "delta_l0": float(freq_l[l_m].sum() - freq_s[s_m].sum()),
        })

    summary = {**_compare_summary(rows, comp_rows, base_mse, n, small_dir, large_dir,
                                  threshold, freq_s, freq_l), **window.report()}
    with outputs.staged_directory(out, "stitch-compare", overwrite=overwrite,
                                  inputs=inputs) as staging:
        write_csv(staging / "stitch.csv", rows, list(rows[0]))
        write_csv(staging / "components.csv", comp_rows,
                  ["component", "n_small", "n_large", "delta_mse", "delta_l0", "small_latents",
                   "large_latents"])
        atomic_write(staging / "summary.json", json_text(summary))
        atomic_write(staging / "summary.md", _compare_markdown(summary))
        _compare_plots(rows, threshold, staging)
    return summary


ROUNDING = 1e-5
"""A change in summed squared error smaller than this fraction of the summed magnitude of the
terms it is the difference of is float32 rounding (the terms are summed in float32 over each
block of tokens), and is reported as 0: swapping a latent for an identical one would
otherwise read as a change of either sign."""


def _beyond_rounding(change: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.where(np.abs(change) <= ROUNDING * scale, 0.0, change)


def _compare_summary(rows, comp_rows, base_mse, n, small_dir, large_dir, threshold,
                     freq_s, freq_l) -> dict[str, Any]:
    sign = {"lower": lambda d: d < 0, "higher": lambda d: d > 0, "unchanged": lambda d: d == 0}
    counts = {f"{kind}_{name}": sum(r["kind"] == kind and test(r["delta_mse"]) for r in rows)
              for kind in ("novel", "reconstruction") for name, test in sign.items()}
    return {
        "small": str(small_dir), "large": str(large_dir), "threshold": threshold, "tokens": n,
        "d_sae_small": len(freq_s), "d_sae_large": len(freq_l),
        "small_mse": base_mse, "small_l0": float(freq_s.sum()), "large_l0": float(freq_l.sum()),
        "novel": sum(r["kind"] == "novel" for r in rows),
        "reconstruction": sum(r["kind"] == "reconstruction" for r in rows),
        **{f"mse_{k}": v for k, v in counts.items()},
        # (apart: a latent that fires but changes nothing, e.g. a zero decoder row, is not one
        # that never fires; fault testing found such latents counted as never firing)
        **{f"{kind}_never_fire": sum(r["kind"] == kind and r["firing_frequency"] == 0
                                     for r in rows) for kind in ("novel", "reconstruction")},
        "components": len(comp_rows),
        "components_lower_mse": sum(c["delta_mse"] < 0 for c in comp_rows),
        "components_lower_l0": sum(c["delta_l0"] < 0 for c in comp_rows),
        "components_lower_both": sum(c["delta_mse"] < 0 and c["delta_l0"] < 0
                                     for c in comp_rows),
    }


def _compare_markdown(s: dict[str, Any]) -> str:
    table = markdown_table(
        [{"": kind, "inserting lowers MSE": s[f"mse_{kind}_lower"],
          "inserting raises MSE": s[f"mse_{kind}_higher"],
          "MSE unchanged": s[f"mse_{kind}_unchanged"], "total": s[kind],
          "of which never fire": s[f"{kind}_never_fire"]}
         for kind in ("novel", "reconstruction")],
        ["", "inserting lowers MSE", "inserting raises MSE", "MSE unchanged", "total",
         "of which never fire"])
    return "\n".join([
        f"# Stitching {s['large']} ({s['d_sae_large']} latents) into {s['small']} "
        f"({s['d_sae_small']})", "",
        f"Latents of the large SAE by their max decoder cosine to the small one (novel: <= "
        f"{s['threshold']}), and the sign of the change in the small SAE's MSE "
        f"({s['small_mse']:.4g} over {s['tokens']} tokens"
        f"{'; ' + describe(s) if describe(s) else ''}) when that one latent is inserted.", "",
        *table, "",
        f"Parent -> children components (cos > {s['threshold']}): {s['components']}; swapping "
        f"one in lowers MSE for {s['components_lower_mse']}, lowers L0 for "
        f"{s['components_lower_l0']}, both for {s['components_lower_both']}.", ""])


def _compare_plots(rows, threshold: float, out: Path) -> None:
    cos = np.array([r["max_cos"] for r in rows])
    delta = np.array([r["delta_mse"] for r in rows])
    fig, ax = subplots(figsize=(6, 4), dpi=120)
    # (a copy's cosine rounds to 1.0000001 in float32: counted in the last bin, not dropped
    # outside the range; fault testing found a third of a Frankenstein's copies missing)
    ax.hist(np.minimum(cos, 1.0), bins=50, range=(min(0.0, cos.min()), 1.0), color="C0")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("max decoder cosine to the small SAE")
    ax.set_ylabel("latents of the large SAE")
    ax.legend()
    save_figure(fig, out / "max_cos_hist.png")

    fig, ax = subplots(figsize=(6, 4), dpi=120)
    novel = cos <= threshold
    ax.scatter(cos[novel], delta[novel], s=6, alpha=0.6, color="C2", label="novel")
    ax.scatter(cos[~novel], delta[~novel], s=6, alpha=0.6, color="C3", label="reconstruction")
    ax.axhline(0, color="grey", lw=1)
    ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("max decoder cosine to the small SAE")
    ax.set_ylabel("change in the small SAE's MSE when inserted")
    ax.legend(loc="upper left")  # ("best" searches every point: slow, with a warning, for many)
    save_figure(fig, out / "delta_mse_vs_max_cos.png")


# ---------------------------------------------------------------------------------------------
# frankenstein


def stitch_family(saes: Sequence[export.LoadedSAE], threshold: float = THRESHOLD
                  ) -> tuple[dict[str, np.ndarray], SAEConfig, list[dict[str, Any]]]:
    """The Frankenstein parameters (SAELens orientation), their SAEConfig, and per SAE of the
    family how many latents it gave. `saes` are sorted by width here."""
    saes = sorted(saes, key=lambda s: s.sae.d_sae)
    acts = {s.sae.activation for s in saes}
    if not acts <= {"relu", "jumprelu"}:
        raise JaxsaeError("frankenstein needs ReLU or JumpReLU SAEs (TopK SAEs: convert them "
                          f"first, as `frankenstein` does; got {', '.join(sorted(acts))})")
    base = saes[0].params
    parts = {k: [v] for k, v in base.items()}
    if "threshold" not in parts:
        parts["threshold"] = [np.zeros_like(base["b_enc"])]
    gave = [{"d_sae": base["W_dec"].shape[0], "added": base["W_dec"].shape[0]}]
    for other in saes[1:]:
        p = other.params
        included = np.concatenate(parts["W_dec"])
        best, _ = max_cosine(p["W_dec"], included)
        keep = best < threshold
        parts["W_enc"].append(p["W_enc"][:, keep])
        # Same pre-activations with the base's b_dec: (x - b0) W + b + (b0 - b) W.
        parts["b_enc"].append((p["b_enc"] + (base["b_dec"] - p["b_dec"]) @ p["W_enc"])[keep])
        parts["W_dec"].append(p["W_dec"][keep])
        parts["threshold"].append(p.get("threshold", np.zeros_like(p["b_enc"]))[keep])
        gave.append({"d_sae": p["W_dec"].shape[0], "added": int(keep.sum())})
    params = {"W_enc": np.concatenate(parts["W_enc"], 1), "W_dec": np.concatenate(parts["W_dec"]),
              "b_enc": np.concatenate(parts["b_enc"]), "b_dec": base["b_dec"]}
    activation = "jumprelu" if "jumprelu" in acts else "relu"
    if activation == "jumprelu":
        params["threshold"] = np.concatenate(parts["threshold"])
    cfg = SAEConfig(d_sae=params["W_dec"].shape[0], activation=activation, decoder_norm="free")
    return params, cfg, gave


def frankenstein(sae_dirs: Sequence[str], data: str, out: str | Path, *,
                 threshold: float = THRESHOLD, retrain_decoder_tokens: int = 2_000_000,
                 tokens: int | None = None, batch_size: int = 4096, lr: float = 1e-3,
                 hook: str | None = None, progress: bool = True,
                 overwrite: bool = False, drop_norm_above: DropRule = TRAINED
                 ) -> list[dict[str, Any]]:
    """Stitches the family, retrains its decoder on `data` (all but the last `tokens`, which
    evaluate everything; None: as training holds out, min(65536, 5 % of the data)), exports
    to out/sae and writes frankenstein.csv / .md.
    `drop_norm_above`: the tokens left out of the retraining and the evaluation
    (`jaxsae.data.window.drop_multiple`; by default those any member's training left out).

    Everything is written into `<out>.partial/` and renamed to `out` when complete; an
    interrupted call leaves the partial directory, and the same call continues its decoder
    retraining from the last checkpoint (a call with other inputs starts it afresh). The
    published out/retrain keeps the retraining's config, metrics and SAE but not its
    checkpoints, so that a later call can replace the output."""
    from jaxsae.config import config_from_dict
    from jaxsae.train import train

    if len(sae_dirs) < 2:
        raise JaxsaeError("frankenstein needs a base SAE and at least one other")
    seen: dict[Path, str] = {}
    for directory in sae_dirs:  # (the same SAE twice would stitch it onto itself)
        if (resolved := Path(directory).resolve()) in seen:
            raise JaxsaeError(f"SAE {directory}: given twice (as {seen[resolved]})")
        seen[resolved] = str(directory)
    out = Path(out).absolute()
    inputs = (*sae_dirs, data)
    outputs.check_target(out, "frankenstein", overwrite=overwrite, inputs=inputs)

    def retraining(d_sae: int, activation: str, eval_tokens: int, dropped: dict) -> dict:
        """The decoder's retraining: an ordinary run in out/retrain, from out/stitched."""
        return {
            "name": "frankenstein", "run_dir": str(out / "retrain"),
            "init_from": str(out / "stitched"),
            "freeze": ["W_enc", "b_enc", "b_dec"] + (["threshold"] if activation == "jumprelu"
                                                    else []),
            "data": {"path": str(Path(data).absolute()), "hook": hook,
                     "eval_tokens": eval_tokens, "normalize": "none", **dropped},
            "sae": {"d_sae": d_sae, "activation": activation, "decoder_norm": "free"},
            "loss": [{"term": "mse"}],
            "optim": {"lr": lr, "batch_size": batch_size,
                      "total_tokens": retrain_decoder_tokens},
        }

    saes = _load_family(sae_dirs)
    source = open_for_saes(data, hook, saes, whose="the SAEs'")
    hook = column_of(source)  # (the SAEs' own, of a cache of several, for the retraining too)
    n_tokens = source.n_tokens
    if tokens is None:
        tokens = DataConfig(path=data).held_out(n_tokens)
        if tokens < 1:  # (fault testing: a traceback, and OUT.partial left behind)
            raise JaxsaeError(f"{data}: {n_tokens} tokens, too few to hold out 5 % of them "
                              "for the evaluation; give --tokens")
    if retrain_decoder_tokens > 0:  # its settings are this command's flags: checked first
        try:
            config_from_dict(retraining(1, "jumprelu", tokens, {}))  # (width: any)
        except JaxsaeError as e:
            raise JaxsaeError(_as_flags(str(e))) from None
        if n_tokens - tokens < batch_size:
            raise JaxsaeError(
                f"{data}: {n_tokens} tokens leave {max(n_tokens - tokens, 0)} to retrain the "
                f"decoder on after the last --tokens {tokens}; need at least --batch-size "
                f"({batch_size}): lower one of them (or --retrain-decoder-tokens 0)")
    window = _eval_window(source, data, saes, tokens, batch_size, drop_norm_above)
    dropped = {} if window.multiple is None else {"drop_norm_above": window.multiple}
    saes, conversions = _as_per_latent(saes, sae_dirs, window)
    params, cfg, gave = stitch_family(saes, threshold)
    # (the stitched SAE's own digest too: fault testing resumed a retraining after a member
    # was replaced, publishing a decoder retrained for the old member's encoder)
    key = {"saes": [str(Path(d).absolute()) for d in sae_dirs],
           "stitched": checkpoint.state_checksum(params).tolist(),
           "data": str(Path(data).absolute()), "threshold": threshold, "tokens": tokens,
           "batch_size": batch_size, "lr": lr, "hook": hook,
           "retrain_decoder_tokens": retrain_decoder_tokens, **dropped}
    with outputs.resumable_staging(out, "frankenstein", key) as work:
        metadata = saes[0].cfg_json.get("metadata", {})
        # the members' training tokens in the data the stitched SAE names (its first member's)
        column = metadata.get("hook_name")
        trained = (trained_end([s.cfg_json for s in saes], where,
                               column if isinstance(column, str) else None)
                   if isinstance(where := metadata.get("dataset_path"), str) else None)
        # evaluated first: its export's sparsity.safetensors is measured on these tokens
        measured = evaluate.reconstruction_metrics(params, cfg, window.blocks())
        # (not the base's figures and training tokens: fault testing found its eval_l0 and
        # explained variance in the stitched SAE's cfg.json; frankenstein.md has the measured)
        own = {k: v for k, v in hub.without_evaluation(metadata).items()
               if k != "training_tokens"}
        stitched = export.export_sae(params, cfg, work / "stitched", metadata=own,
                                     log10_firing=evaluate.log10_firing(
                                         measured["firing_frequency"]),
                                     training={"stitched_from": [str(Path(d).absolute())
                                                                 for d in sae_dirs],
                                               "threshold": threshold, **dropped,
                                               **({} if trained is None
                                                  else {"held_out_from": trained})})
        final = stitched
        retrain = None
        if retrain_decoder_tokens > 0:
            retrain = retraining(cfg.d_sae, cfg.activation, window.tokens, dropped)
            staged = {**retrain, "run_dir": str(work / "retrain"), "init_from": str(stitched)}
            if (work / "retrain" / "sae").is_dir() and not (work / "retrain" / "checkpoints"
                                                             ).exists():
                final = work / "retrain" / "sae"  # complete: only publishing failed last time
            else:
                try:
                    # (its notes too in this command's flags: fault testing found
                    # "optim.total_tokens passes over ..." for --retrain-decoder-tokens)
                    final = train(config_from_dict(staged), progress=progress,
                                  log=lambda message: print(_as_flags(message).replace(
                                      str(work), str(out)))).sae_dir
                except NonFiniteError as e:  # (its advice names the run's config and run_dir)
                    raise NonFiniteError(
                        f"the decoder's retraining diverged ({str(e).split(';')[0]}); lower "
                        f"--lr, or check {data} with jaxsae data inspect") from None
                except JaxsaeError as e:  # the retraining's config is made of this command's flags
                    e.args = (_as_flags(str(e)),)
                    raise
        shutil.rmtree(work / "sae", ignore_errors=True)  # from an interrupted call: redone
        shutil.copytree(final, work / "sae")

        rows = []
        named = [*((str(d), s, None) for d, s in zip(sae_dirs, saes, strict=True)),
                 ("frankenstein (stitched)", export.load_sae(stitched), measured)]
        if final != stitched:
            named.append(("frankenstein (decoder retrained)", export.load_sae(final), None))
        for name, loaded, m in named:
            if m is None:
                m = evaluate.reconstruction_metrics(loaded.params, loaded.sae, window.blocks())
            rows.append({"sae": name, "d_sae": loaded.params["W_dec"].shape[0],
                         "architecture": loaded.cfg_json["architecture"], "l0": m["l0"],
                         "mse": m["mse"], "explained_variance": m["explained_variance"]})
        columns = ["sae", "d_sae", "architecture", "l0", "mse", "explained_variance"]
        write_csv(work / "frankenstein.csv", rows, columns)
        by_width = sorted(zip(sae_dirs, saes, strict=True), key=lambda ds: ds[1].sae.d_sae)
        gave_rows = [{"sae": str(Path(d).absolute()), **g}
                     for (d, _), g in zip(by_width, gave, strict=True)]
        converted = [] if not conversions else [
            "TopK SAEs converted to JumpReLU (per-latent thresholds calibrated on the "
            f"{conversions[0]['calibration_tokens']} tokens before the evaluation window; the "
            "change in codes measured on the evaluation tokens):", "",
            *markdown_table(conversions, CONVERSION_COLUMNS), ""]
        atomic_write(work / "frankenstein.md", "\n".join([
            f"# Frankenstein SAE ({cfg.d_sae} latents, threshold {threshold})", "",
            *converted,
            "Latents taken from each SAE of the family (widest last):", "",
            *markdown_table(gave_rows, ["sae", "d_sae", "added"]), "",
            f"Evaluated on the last {window.tokens} tokens of {data}"
            f"{f' ({said})' if (said := describe(window.report())) else ''}:", "",
            *markdown_table(rows, columns), ""]))
        if retrain is not None:  # the run directory's own config names where it ends up
            retrain_config = work / "retrain" / "config.yaml"
            atomic_write(retrain_config, config_from_dict(retrain).to_yaml())
            # Its checkpoints served only to resume an interrupted call: kept, they would make the
            # published output hold a training run, which jaxsae never replaces (not even with
            # --overwrite), so a later call could not replace this output.
            if (work / "retrain" / "checkpoints").exists():  # (gone: removed by a call that
                shutil.rmtree(work / "retrain" / "checkpoints")  # failed to publish)
        outputs.publish(work, out, "frankenstein", overwrite=overwrite, inputs=inputs)
    return rows
