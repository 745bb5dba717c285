"""Feature geometry of one dictionary (`jaxsae analyze SAE_DIR --data DIR --out DIR`).

Over a sample of activations:

- density: each latent's firing frequency (log10 histogram) and, per latent, the histogram of
  its non-zero activations on bins [0, its max]; latents with several peaks are candidates for
  absorbed or circular structure (`n_peaks`);
- co-firing (dense latents, firing on > 10% of tokens, left out): the Jaccard similarity
  |A and B| / |A or B| of the token sets on which latents fire, the top pairs, and parent /
  child candidates: B fires almost only when A fires (P(A | B) >= 0.9) while A fires more
  often, but not everywhere (P(A | B) >= 2 P(A));
- decoder geometry: each latent's nearest neighbours by decoder cosine, and clusters
  (connected components of cos > threshold).

Everything is written as CSV and PNG, with an index.html that shows it on one page.
"""

from __future__ import annotations

import html
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import export, outputs, sae
from jaxsae.analysis import optimality as optimality_mod
from jaxsae.analysis import taxonomy
from jaxsae.analysis.stitch import unit_rows
from jaxsae.config import SAEConfig
from jaxsae.data import open_for_saes
from jaxsae.data.window import TRAINED, DropRule, Window
from jaxsae.errors import JaxsaeError, refuse_past_float32
from jaxsae.evaluate import DENSE_FREQUENCY
from jaxsae.outputs import atomic_write, hist_range, json_text, save_figure, subplots, write_csv
from jaxsae.progress import Progress

BINS = 32
MAX_PLANAR = 8192
"""Most latents whose circle test (a pass over the tokens per latent's plane) is run."""
OPTIMALITY_COLUMNS = ["latent_a", "latent_b", "stable", "margin", "decoder_cos",
                      "tilt_a_absorbs_b", "tilt_b_absorbs_a", "a_share_with_b",
                      "b_share_with_a"]


# ---------------------------------------------------------------------------------------------
# Pieces (each a plain function of codes or weights)


def cofiring(rows: np.ndarray, cols: np.ndarray, n_tokens: int, n_latents: int):
    """Co-firing counts of the latents from the (token, latent) positions of non-zero codes:
    (i, j, count) for i < j with count > 0, and each latent's firing count."""
    from scipy.sparse import coo_matrix

    fired = coo_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                       shape=(n_tokens, n_latents)).tocsr()
    fired.data[:] = 1.0  # a latent counts once per token
    both = (fired.T @ fired).tocoo()
    upper = both.row < both.col
    fires = np.asarray(fired.sum(0)).ravel().astype(np.int64)
    return both.row[upper], both.col[upper], both.data[upper].astype(np.int64), fires


def jaccard(i, j, count, fires) -> np.ndarray:
    return count / (fires[i] + fires[j] - count)


def parent_child(i, j, count, fires, n_tokens: int, *, threshold: float = 0.9,
                 min_count: int = 10, min_lift: float = 2.0):
    """(parent, child, P(parent | child), child fires, lift) where the child fires almost only
    with the parent (P >= threshold), the parent fires more often, and not merely because it
    fires everywhere: lift = P(parent | child) / P(parent) >= min_lift. Sorted by child
    firing count."""
    out = []
    for a, b in ((i, j), (j, i)):  # a parent of b?
        p = count / np.maximum(fires[b], 1)
        lift = p / np.maximum(fires[a] / n_tokens, 1e-12)
        keep = ((p >= threshold) & (fires[b] >= min_count) & (fires[a] > fires[b])
                & (lift >= min_lift))
        out.append(np.stack([a[keep], b[keep], p[keep], fires[b][keep], lift[keep]], 1))
    pairs = np.concatenate(out)
    return pairs[np.argsort(-pairs[:, 3], kind="stable")]


def optimality_candidates(i, j, count, parents: np.ndarray, min_count: int,
                          limit: int) -> np.ndarray:
    """[m, 2] pairs to test for optimality: the children of each parent candidate with one
    another (rarely firing together, they are what a hierarchy splits into), then co-firing
    pairs (>= min_count tokens together), most co-firing first; at most `limit`."""
    keep = count >= min_count
    order = np.argsort(-count[keep], kind="stable")
    co = np.stack([i[keep][order], j[keep][order]], 1)
    siblings = []
    if len(parents):
        for parent in np.unique(parents[:, 0]):
            kids = np.sort(parents[parents[:, 0] == parent, 1].astype(np.int64))
            siblings += [(a, b) for x, a in enumerate(kids) for b in kids[x + 1:]]
    both = np.concatenate([np.asarray(siblings, np.int64).reshape(-1, 2), co.astype(np.int64)])
    both = np.sort(both, axis=1)
    _, first = np.unique(both, axis=0, return_index=True)
    return both[np.sort(first)][:limit]


def decoder_graph(W_dec: np.ndarray, k: int, threshold: float, block: int = 2048
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the decoder's cosines, block by block (the [n, n] matrix is never held
    whole): each latent's k nearest other latents (indices, cosines [n, k]) and a cluster label
    per latent (connected components of cos > threshold between distinct latents)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(W_dec)
    unit = jnp.asarray(unit_rows(W_dec))
    k = min(k, n - 1)
    idx, cos, q, r = [], [], [], []
    for start in range(0, n, block):
        c = unit[start : start + block] @ unit.T
        rows = jnp.arange(c.shape[0])
        c = c.at[rows, rows + start].set(-jnp.inf)  # not itself
        v, i = jax.lax.top_k(c, k)
        idx.append(np.asarray(i))
        cos.append(np.asarray(v))
        near = np.nonzero(np.asarray(c > threshold))  # (XLA's nonzero is slow on the CPU)
        q.append(near[0] + start)
        r.append(near[1])
    q, r = np.concatenate(q), np.concatenate(r)
    graph = coo_matrix((np.ones(len(q)), (q, r)), shape=(n, n))
    return np.concatenate(idx), np.concatenate(cos), connected_components(graph,
                                                                           directed=False)[1]


def count_peaks(hist: np.ndarray, prominence: float = 0.05) -> np.ndarray:
    """Peaks of each row of `hist` [n, bins] (counts), smoothed with a [1, 4, 6, 4, 1] kernel,
    that rise above the valleys around them by at least `prominence` x the row's highest
    smoothed bin and 3 sqrt(that bin) (several times its Poisson noise): bin-to-bin noise is
    not a peak; a spike of small activations next to a bump is two. A row with counts has at
    least its highest peak (fault testing: a latent firing on 20 tokens, too few to rise above
    the noise allowance, had none, and was called `single`)."""
    from scipy.signal import find_peaks

    kernel = np.array([1, 4, 6, 4, 1]) / 16
    out = np.zeros(len(hist), np.int64)
    for k, row in enumerate(hist.astype(np.float64)):
        smooth = np.convolve(np.pad(row, 2), kernel, mode="valid")
        if smooth.max() > 0:  # zeros beside the row, so a peak at either end counts
            need = max(prominence * smooth.max(), 3 * np.sqrt(smooth.max()))
            out[k] = max(len(find_peaks(np.pad(smooth, 1), prominence=need)[0]), 1)
    return out


# ---------------------------------------------------------------------------------------------
# The passes over the data


def _over_tokens(operands, inits, combine):
    """Reductions of several [batch, n] arrays over the batch in one pass (one lax.reduce of
    all of them): XLA-CPU runs each reduction over the batch axis as a pass of its own, at
    about three times the time of reading its operand (four of [1024, 65536] float32: 1.10 s
    apart, 0.15 s together, measured 2026-12-03)."""
    return jax.lax.reduce(tuple(operands), tuple(jnp.float32(v) for v in inits), combine, (0,))


@partial(jax.jit, static_argnames="cfg", donate_argnames="inputs")
def _first_pass(params, x, inputs, cfg: SAEConfig):
    """The codes of a batch and its per-latent statistics; `inputs` [d_in, n] (donated):
    the running sum, per latent (column), of the centred inputs of the tokens it fires on."""
    f = sae.encode(params, x, cfg).astype(jnp.float32)
    fires, top, total, total2 = _over_tokens(
        ((f > 0).astype(jnp.float32), f, f, f * f), (0.0, -jnp.inf, 0.0, 0.0),
        lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1]), a[2] + b[2], a[3] + b[3]))
    inputs = inputs + (x - params["b_dec"]).T @ (f > 0).astype(jnp.float32)
    return f, {"fires": fires.astype(jnp.int32), "max": top, "sum": total,
               "sum2": total2}, inputs


@partial(jax.jit, static_argnames="cfg")
def _histogram_pass(params, x, top, planar, basis, cfg: SAEConfig):
    """The activation histograms; for the `planar` latents the input's projection on their
    plane (`basis` [m, 2, d]) where they fire: count, sum and sum of squares of its radius
    [3, m] and the histogram of its angle [m, ANGLE_BINS]."""
    f = sae.encode(params, x, cfg)
    b = jnp.clip(jnp.floor(f / jnp.maximum(top, 1e-30) * BINS).astype(jnp.int32), 0, BINS - 1)
    cols = jnp.broadcast_to(jnp.arange(f.shape[1]), f.shape)
    hist = jnp.zeros((f.shape[1], BINS), jnp.int32).at[cols, b].add((f > 0).astype(jnp.int32))
    point = jnp.einsum("bd,mkd->bmk", x - params["b_dec"], basis)
    radius = jnp.linalg.norm(point, axis=-1)
    on = (f[:, planar] > 0).astype(jnp.float32)
    angle = jnp.arctan2(point[..., 1], point[..., 0])  # [B, m]
    a_bin = jnp.clip(jnp.floor((angle + jnp.pi) / (2 * jnp.pi) * taxonomy.ANGLE_BINS)
                     .astype(jnp.int32), 0, taxonomy.ANGLE_BINS - 1)
    m_cols = jnp.broadcast_to(jnp.arange(angle.shape[1]), angle.shape)
    angles = jnp.zeros((angle.shape[1], taxonomy.ANGLE_BINS), jnp.float32).at[
        m_cols, a_bin].add(on)
    return hist, jnp.stack([on.sum(0), (on * radius).sum(0), (on * radius**2).sum(0)]), angles


def carry_sums(inputs: np.ndarray, unit: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """[3, n] sums of the input's projection on unit decoder directions: on each latent's own
    tokens along its own direction, along its `partner`'s, and on the partner's tokens along
    its own. Linear in the inputs, so each is a dot product of a latent's (or its
    partner's) summed inputs `inputs` [n, d] (`_first_pass`) with a direction; projecting
    every token on every direction instead costs a [tokens, n] matmul and two gathers of it."""
    return np.stack([np.einsum("nd,nd->n", inputs, unit),
                     np.einsum("nd,nd->n", inputs, unit[partner]),
                     np.einsum("nd,nd->n", inputs[partner], unit)])


def analyze(sae_dir: str, data: str, out: str | Path, *, tokens: int = 65536,
            cofire_tokens: int = 16384, batch_size: int = 4096, cluster_threshold: float = 0.7,
            neighbours: int = 5, top_pairs: int = 100, child_threshold: float = 0.9,
            min_count: int = 10, hook: str | None = None, progress: bool = True,
            overwrite: bool = False, optimality: bool = False, optimality_pairs: int = 20000,
            sparsity_weight: float | None = None,
            drop_norm_above: DropRule = TRAINED) -> dict[str, Any]:
    """Writes the analysis of `sae_dir` on the last `tokens` activations of `data` to `out`
    (staged, then renamed into place; see `outputs.check_target`). `optimality`: also the
    first-order optimality conditions (`jaxsae.analysis.optimality`) of every latent and of up
    to `optimality_pairs` candidate pairs (co-firing pairs, most co-firing first, and the
    children of each parent candidate with one another), under the sparsity weight
    `sparsity_weight` (None: the one the codes imply). `drop_norm_above`: the tokens left out
    (`jaxsae.data.window.drop_multiple`; by default those the SAE's training left out)."""
    outputs.check_target(out, "analyze", overwrite=overwrite, inputs=(sae_dir, data))
    loaded = export.load_sae(sae_dir)
    source = open_for_saes(data, hook, [loaded])
    params = jax.tree.map(jnp.asarray, loaded.params)
    window = Window.for_saes(source, data, max(0, source.n_tokens - tokens),
                             saes=[loaded.cfg_json], rule=drop_norm_above,
                             batch_size=batch_size)
    n = loaded.params["W_dec"].shape[0]
    if n < 2:  # (fault testing: a traceback where the taxonomy read a first neighbour)
        raise JaxsaeError(f"{sae_dir}: has {n} latent; its feature geometry (neighbours, "
                          "partners, planes) needs at least 2")
    bar = Progress((3 if optimality else 2) * window.tokens, unit="tok", unit_scale=True,
                   enabled=progress, desc="analyze")

    # The decoder's geometry first: the taxonomy's planes are measured in the passes.
    nb_idx, nb_cos, clusters = decoder_graph(loaded.params["W_dec"], neighbours,
                                             cluster_threshold)
    unit = unit_rows(loaded.params["W_dec"])
    fires, top, total, total2 = np.zeros(n, np.int64), np.zeros(n), np.zeros(n), np.zeros(n)
    rows, cols, seen = [], [], 0
    inputs = jnp.zeros((source.d_in, n), jnp.float32)
    for x in window.blocks(bar.update):
        f, s, inputs = _first_pass(params, jnp.asarray(x, jnp.float32), inputs, loaded.sae)
        s = jax.device_get(s)
        fires += s["fires"]
        top = np.maximum(top, s["max"])
        total += s["sum"]
        total2 += s["sum2"]
        if seen < cofire_tokens:
            t, j = np.nonzero(np.asarray(f[: cofire_tokens - seen] > 0))  # (a 4x smaller copy)
            rows.append(t + seen)
            cols.append(j)
            seen += min(len(x), cofire_tokens - seen)
    n_tok = window.kept
    i, j, count, co_fires = cofiring(np.concatenate(rows), np.concatenate(cols), seen, n)
    together = taxonomy.cofiring_matrix(n, i, j, count)
    partner = taxonomy.partners(together, co_fires, nb_idx, nb_cos, unit, seen)
    plane = taxonomy.planes(unit, nb_idx, nb_cos, together)
    planar = np.flatnonzero(plane["planar"])[:MAX_PLANAR]
    paired = np.where(partner["partner"] >= 0, partner["partner"], np.arange(n))
    hist = np.zeros((n, BINS), np.int64)
    ring = np.zeros((3, len(planar)))
    angles = np.zeros((len(planar), taxonomy.ANGLE_BINS))
    carry = carry_sums(np.asarray(inputs).T, unit, paired).astype(np.float64)
    del inputs
    basis = jnp.asarray(plane["basis"][planar])
    for x in window.blocks(bar.update):
        h, r, a = _histogram_pass(params, jnp.asarray(x, jnp.float32),
                                  jnp.asarray(top, jnp.float32), jnp.asarray(planar), basis,
                                  loaded.sae)
        hist += np.asarray(h)
        ring += np.asarray(r, np.float64)
        angles += np.asarray(a, np.float64)

    # (fault testing: tokens of norm 1e18 wrote ring_cv inf, and 1e10 a stationarity z of 0
    # for every latent: inf - inf)
    refuse_past_float32({"activations": total, "activations_squared": total2, "inputs": carry,
                         "ring_radii": ring}, data,
                        "the tokens or the SAE's codes are too large to analyse", out=out)
    frequency = fires / n_tok
    # Dense latents co-fire with everything: they are left out of pairs and parent / child.
    dense = co_fires / max(seen, 1) > DENSE_FREQUENCY
    every_pair = i, j, count  # (the optimality conditions test dense latents too)
    sparse_pair = ~dense[i] & ~dense[j]
    i, j, count = i[sparse_pair], j[sparse_pair], count[sparse_pair]
    jac = jaccard(i, j, count, co_fires)
    order = np.argsort(-jac, kind="stable")
    order = order[count[order] >= min_count][:top_pairs]
    pairs = [{"latent_a": int(i[o]), "latent_b": int(j[o]), "jaccard": float(jac[o]),
              "both": int(count[o]), "fires_a": int(co_fires[i[o]]),
              "fires_b": int(co_fires[j[o]])} for o in order]
    pc = parent_child(i, j, count, co_fires, seen, threshold=child_threshold,
                      min_count=min_count)
    parents = [{"parent": int(a), "child": int(b), "p_parent_given_child": float(p),
                "lift": float(lift), "child_fires": int(c),
                "parent_fires": int(co_fires[int(a)])} for a, b, p, c, lift in pc]
    opt = None
    if optimality:
        candidates = optimality_candidates(
            *every_pair, parent_child(*every_pair, co_fires, seen, threshold=child_threshold,
                                      min_count=min_count), min_count, optimality_pairs)
        opt = optimality_mod.optimality(
            loaded.params, loaded.sae, window.blocks(bar.update), candidates,
            sparsity_weight=sparsity_weight, data=data, out=out)
    bar.close()
    sizes = np.bincount(clusters)
    peaks = count_peaks(hist)
    # (NaN, written as nan: a latent that never fired has no mean activation, nor a ring
    # whose radii all are 0 a spread)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_active = np.where(fires > 0, total / fires, np.nan)
        std_active = np.sqrt(np.maximum(total2 / fires - mean_active**2, 0.0))
    ring_cv, arc = np.full(n, np.nan), np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        r_mean = ring[1] / ring[0]
        ring_cv[planar] = np.where(
            r_mean > 0, np.sqrt(np.maximum(ring[2] / ring[0] - r_mean**2, 0.0)) / r_mean,
            np.nan)
    arc[planar] = taxonomy.longest_arc(angles)
    with np.errstate(divide="ignore", invalid="ignore"):
        # how fully a latent's tokens hold its partner's direction, against the partner's own
        own = carry[0] / fires
        carries = np.nan_to_num(carry[1] / fires / own[paired])
        carried = np.nan_to_num(carry[2] / fires[paired] / own)
    kinds = taxonomy.classify(
        frequency=frequency, mean=mean_active, std=std_active, peaks=peaks, ring_cv=ring_cv,
        arc=arc, plane=plane, partner=partner["partner"], partner_cos=partner["partner_cos"],
        p_partner=partner["p_partner"], carries=carries, carried=carried,
        nearest=nb_idx[:, 0], nearest_cos=nb_cos[:, 0])
    latents = [{"latent": k, "kind": kinds[k]["kind"],
                "firing_frequency": float(frequency[k]),
                "log10_frequency": float(np.log10(max(frequency[k], 1e-10))),
                "max_activation": float(top[k]), "mean_activation": float(mean_active[k]),
                "n_peaks": int(peaks[k]),
                "decoder_norm": float(np.linalg.norm(loaded.params["W_dec"][k])),
                "nearest": int(nb_idx[k, 0]), "nearest_cos": float(nb_cos[k, 0]),
                "cluster": int(clusters[k]), "cluster_size": int(sizes[clusters[k]]),
                **{key: v for key, v in kinds[k].items() if key != "kind"}}
               for k in range(n)]
    kind_fractions = {kind: float(np.mean([r["kind"] == kind for r in latents]))
                      for kind in taxonomy.KINDS}
    big = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] > 1]
    cluster_rows = [{"cluster": int(c), "size": int(sizes[c]),
                     "latents": ";".join(map(str, np.nonzero(clusters == c)[0]))} for c in big]

    summary = {
        "sae": str(Path(sae_dir).absolute()), "data": str(Path(data).absolute()), "tokens": n_tok,
        **window.report(),
        "cofire_tokens": seen,
        "d_sae": n, "l0": float(fires.sum() / n_tok),
        "dead_fraction": float(np.mean(fires == 0)),
        "dense_fraction": float(np.mean(frequency > DENSE_FREQUENCY)),
        "multi_peaked": int(np.sum(peaks >= 2)),
        "cofiring_pairs_listed": len(pairs), "parent_child_candidates": len(parents),
        "decoder_clusters": len(cluster_rows),
        "latents_in_clusters": int(sum(r["size"] for r in cluster_rows)),
        "cluster_threshold": cluster_threshold,
        "median_nearest_cos": float(np.median(nb_cos[:, 0])),
        "kind_fractions": kind_fractions,
        **(opt[2] if opt is not None else {}),
    }
    with outputs.staged_directory(out, "analyze", overwrite=overwrite,
                                  inputs=(sae_dir, data)) as staging:
        write_csv(staging / "latents.csv", latents, list(latents[0]))
        write_csv(staging / "activation_histograms.csv",
                  [{"latent": k, "max_activation": float(top[k]),
                    **{f"bin{b}": int(hist[k, b]) for b in range(BINS)}} for k in range(n)],
                  ["latent", "max_activation", *(f"bin{b}" for b in range(BINS))])
        write_csv(staging / "cofiring_pairs.csv", pairs,
                  ["latent_a", "latent_b", "jaccard", "both", "fires_a", "fires_b"])
        write_csv(staging / "parent_child.csv", parents,
                  ["parent", "child", "p_parent_given_child", "lift", "child_fires",
                   "parent_fires"])
        write_csv(staging / "neighbours.csv",
                  [{"latent": k, "rank": r + 1, "neighbour": int(nb_idx[k, r]),
                    "cos": float(nb_cos[k, r])}
                   for k in range(n) for r in range(nb_idx.shape[1])],
                  ["latent", "rank", "neighbour", "cos"])
        write_csv(staging / "clusters.csv", cluster_rows, ["cluster", "size", "latents"])
        atomic_write(staging / "summary.json", json_text(summary))
        _plots(frequency, hist, top, peaks, jac, count, min_count, nb_cos, sizes, staging)
        if opt is not None:
            write_csv(staging / "optimality_latents.csv", opt[0], list(opt[0][0]))
            write_csv(staging / "optimality.csv", opt[1], OPTIMALITY_COLUMNS)
            optimality_mod.plot(opt[0], opt[1], staging)
        curves = _training_curves(Path(sae_dir))
        if curves is not None:
            shutil.copyfile(curves, staging / outputs.CURVES)
        atomic_write(staging / "index.html",
                     _index_html(summary, latents, pairs, parents, cluster_rows,
                                 curves is not None, opt))
    return summary


def _plots(frequency, hist, top, peaks, jac, count, min_count, nb_cos, sizes, out: Path):
    fig, ax = subplots(figsize=(6, 3.6), dpi=110)
    alive = frequency > 0
    logf = np.log10(frequency[alive])
    ax.hist(logf, bins=60, range=hist_range(logf), color="C0")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{np.sum(~alive)} latents never fired")
    save_figure(fig, out / "density.png")

    # Multi-peaked latents (most peaks first, then most firing), beside their histograms.
    order = np.lexsort((-hist.sum(1), -peaks))[:12]
    fig, axes = subplots(3, 4, figsize=(10, 6), dpi=100)
    for ax, k in zip(axes.ravel(), order, strict=False):
        edges = np.linspace(0, top[k], BINS + 1)
        ax.bar(edges[:-1], hist[k], width=np.diff(edges), align="edge", color="C1")
        ax.set_title(f"latent {k}: {peaks[k]} peak(s)", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(order):]:
        ax.axis("off")
    fig.suptitle("non-zero activations of the most multi-peaked latents", fontsize=9)
    save_figure(fig, out / "activation_histograms.png")

    fig, axes = subplots(1, 3, figsize=(12, 3.6), dpi=100)
    supported = count >= min_count
    axes[0].hist(jac[supported], bins=50, range=hist_range(jac[supported]), color="C2",
                 log=bool(supported.any()))
    axes[0].set_xlabel(f"Jaccard of co-firing pairs (>= {min_count} tokens together)")
    axes[0].set_ylabel("pairs")
    axes[1].hist(nb_cos[:, 0], bins=50, range=hist_range(nb_cos[:, 0]), color="C3")
    axes[1].set_xlabel("decoder cosine to the nearest other latent")
    axes[1].set_ylabel("latents")
    axes[2].hist(sizes[sizes > 1], bins=np.arange(2, max(3, sizes.max() + 2)) - 0.5
                 if sizes.max() > 1 else 1, color="C4")
    axes[2].set_xlabel("decoder cluster size")
    axes[2].set_ylabel("clusters")
    save_figure(fig, out / "geometry.png")


def _table(rows: list[dict], limit: int = 25) -> str:
    if not rows:
        return "<p>none</p>"
    cols = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in cols) + "</tr>"
                   for r in rows[:limit])
    more = f"<p>{len(rows) - limit} more in the CSV.</p>" if len(rows) > limit else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _training_curves(sae_dir: Path) -> Path | None:
    """The curves.png of the run the SAE came from: runs/NAME/sae, or a sweep's
    runs/NAME/sweep/<i>/sae (None for an SAE outside a run). Of the SAE's resolved path
    (fault testing: `analyze .` inside runs/NAME/sae looked beside `.` and found none)."""
    run = sae_dir.resolve().parent
    if run.parent.name == "sweep":
        run = run.parent.parent
    found = run / outputs.CURVES
    return found if found.is_file() else None


def _optimality_html(opt) -> str:
    if opt is None:
        return ""
    latent_rows, pair_rows, s = opt
    worst = sorted(pair_rows, key=lambda r: r["margin"])
    moving = sorted((r for r in latent_rows if r["fires"] and not r["stationary"]),
                    key=lambda r: -r["refit_angle_deg"])
    weight = ("none (no latent fired)" if s["optimality_lambda"] is None
              else f"{s['optimality_lambda']:.4g}")
    live = ("no latent fired" if s["stationary_fraction"] is None
            else f"{s['stationary_fraction']:.1%} of live latents have a stationary decoder "
                 "direction")
    return f"""<h2>Optimality</h2>
<p>First-order conditions of dictionary learning under sparsity weight
{weight} (docs/optimality.md): {s['pairs_unstable']} of {s['pairs_tested']}
candidate pairs are unstable (one latent could absorb the other's direction and lower the
loss: no local optimum holds both); {live}. optimality.csv, optimality_latents.csv.</p>
<img src="optimality.png"><h3>Least stable pairs</h3>{_table(worst)}
<h3>Latents farthest from stationary</h3>{_table(moving)}"""


def _index_html(summary, latents, pairs, parents, clusters, curves: bool = False,
                opt=None) -> str:
    multi = sorted((r for r in latents if r["n_peaks"] >= 2),
                   key=lambda r: (-r["n_peaks"], -r["firing_frequency"]))
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in summary.items() if k != "kind_fractions")
    kinds = [{"kind": kind, "fraction": share,
              "latents": sum(r["kind"] == kind for r in latents)}
             for kind, share in summary["kind_fractions"].items()]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jaxsae analyze: {html.escape(summary['sae'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse;font-size:13px;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}img{{max-width:100%}}</style>
</head><body>
<h1>{html.escape(summary['sae'])}</h1>
<table>{facts}</table>
<h2>Kinds of latent</h2>
<p>Each latent's <code>kind</code> in latents.csv, with the evidence columns behind it
(jaxsae.analysis.taxonomy), the first that applies: dead, circular (its decoder in a plane
with others', its tokens along an arc of a ring there), child / parent (it carries a
partner's component: it fires almost only with it, or never with it while their decoders
share a direction), duplicate (its decoder's nearest other has cos &ge; 0.9 and fires: one
feature learnt twice), dense (&gt; 10% of tokens), variable (broad or multi-peaked magnitudes),
single (one peak).</p>
{_table(kinds)}
<h2>Density</h2><img src="density.png">
<h2>Activation histograms</h2>
<p>Latents whose non-zero activations have several peaks (candidates for absorbed or circular
structure); every histogram is in activation_histograms.csv.</p>
<img src="activation_histograms.png">{_table(multi)}
<h2>Co-firing</h2>
<p>Top pairs by Jaccard similarity (cofiring_pairs.csv); parent / child candidates: the child
fires almost only with the parent (parent_child.csv).</p>
{_table(pairs)}<h3>Parent / child candidates</h3>{_table(parents)}
<h2>Decoder geometry</h2><img src="geometry.png">
<p>Clusters of decoder cos &gt; {summary['cluster_threshold']} (clusters.csv); nearest
neighbours of every latent in neighbours.csv.</p>{_table(clusters)}
<p>Per latent: latents.csv.</p>
{_optimality_html(opt)}
{'<h2>Training</h2><p>The run the SAE came from (curves.png).</p><img src="curves.png">'
 if curves else ''}
</body></html>
"""
