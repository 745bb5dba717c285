"""A TopK SAE as a JumpReLU SAE: per-latent thresholds calibrated on data
(`jaxsae convert`; `stitch frankenstein` converts TopK members itself).

A TopK latent's code depends on the rest of its SAE (it fires when it is among a token's k
largest), so per-latent tools (stitching) cannot take it as it is. A JumpReLU latent
fires when its own pre-activation exceeds its threshold. For each latent the threshold is the
one that best reproduces its TopK firing decisions on the calibration tokens: from histograms
of its positive pre-activations where TopK kept it and where it did not, the bin edge that
minimises (kept below it) + (not kept above it). The weights are unchanged. The change is
measured on other tokens (the evaluation tokens): of TopK's codes, the share the JumpReLU
keeps (recall), of the JumpReLU's, the share TopK has (precision), both L0s and both
explained variances.

(BatchTopK needs none of this: its inference is already a JumpReLU with the learned batch
threshold, and it exports as one.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import evaluate, export, hub, outputs, sae
from jaxsae.config import SAEConfig
from jaxsae.data.window import TRAINED, DropRule, Window, trained_drop
from jaxsae.errors import JaxsaeError
from jaxsae.progress import Progress

BINS = 512


@partial(jax.jit, static_argnames="cfg")
def _pre_and_kept(params, x, cfg: SAEConfig):
    pre = sae.pre_activations(params, x, cfg)
    return pre, sae.encode(params, x, cfg) > 0


@partial(jax.jit, static_argnames="cfg")
def _max_pass(params, x, cfg: SAEConfig):
    return jnp.max(_pre_and_kept(params, x, cfg)[0], axis=0)


@partial(jax.jit, static_argnames="cfg")
def _histogram_pass(params, x, top, cfg: SAEConfig):
    """[2, n, BINS]: positive pre-activations on bins of [0, top], where TopK kept the latent
    and where it did not."""
    pre, kept = _pre_and_kept(params, x, cfg)
    b = jnp.clip(jnp.floor(pre / jnp.maximum(top, 1e-30) * BINS).astype(jnp.int32), 0, BINS - 1)
    cols = jnp.broadcast_to(jnp.arange(pre.shape[1]), pre.shape)
    positive = pre > 0
    out = jnp.zeros((2, pre.shape[1], BINS), jnp.int32)
    out = out.at[0, cols, b].add((positive & kept).astype(jnp.int32))
    return out.at[1, cols, b].add((positive & ~kept).astype(jnp.int32))


def calibrate(params: dict[str, Any], cfg: SAEConfig,
              blocks: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
    """[d_sae] JumpReLU thresholds reproducing the TopK SAE's firing on `blocks()` (called
    twice: two passes)."""
    p = jax.tree.map(jnp.asarray, params)
    top = None
    for x in blocks():
        m = _max_pass(p, jnp.asarray(x, jnp.float32), cfg)
        top = m if top is None else jnp.maximum(top, m)
    hist = np.zeros((2, cfg.d_sae, BINS), np.int64)
    for x in blocks():
        hist += np.asarray(_histogram_pass(p, jnp.asarray(x, jnp.float32), top, cfg))
    kept, other = hist
    # threshold at edge e (bins [0, e) below): errors = kept below + other at or above
    kept_below = np.concatenate([np.zeros((cfg.d_sae, 1)), np.cumsum(kept, 1)], 1)
    other_above = np.concatenate([np.cumsum(other[:, ::-1], 1)[:, ::-1],
                                  np.zeros((cfg.d_sae, 1))], 1)
    edge = np.argmin(kept_below + other_above, axis=1)  # the lowest edge among ties
    width = np.maximum(np.asarray(top, np.float64), 0.0) / BINS
    return (edge * width).astype(np.float32)


def as_jumprelu(loaded: export.LoadedSAE, threshold: np.ndarray
                ) -> tuple[dict[str, np.ndarray], SAEConfig]:
    # the decoder is the TopK SAE's: unit rows stay unit (import then fine-tunes them so)
    unit = sae.unit_rows(loaded.params["W_dec"], loaded.stored_dtype)
    cfg = SAEConfig(d_sae=loaded.sae.d_sae, activation="jumprelu",
                    decoder_norm="unit" if unit else "free")
    params = {k: v for k, v in loaded.params.items()}
    return {**params, "threshold": np.asarray(threshold, np.float32)}, cfg


@partial(jax.jit, static_argnames=("cfg_a", "cfg_b"))
def _compare_block(params_a, cfg_a, params_b, cfg_b, x):
    """Each SAE's `evaluate.sums_of_codes` of the block, and how many codes are on in A, in
    B, and in both: one encode per SAE (the agreement once took a second pair)."""
    codes_a = sae.encode(params_a, x, cfg_a)
    codes_b = sae.encode(params_b, x, cfg_b)
    on_a, on_b = codes_a > 0, codes_b > 0
    return (evaluate.sums_of_codes(params_a, codes_a, x, x),
            evaluate.sums_of_codes(params_b, codes_b, x, x),
            jnp.stack([jnp.sum(on_a), jnp.sum(on_b), jnp.sum(on_a & on_b)]))


def compare(loaded: export.LoadedSAE, params: dict[str, np.ndarray], cfg: SAEConfig,
            blocks: Iterable[np.ndarray]) -> dict[str, Any]:
    """How the converted SAE's codes differ from the TopK SAE's on `blocks`; with its latents'
    `firing_frequency` there. The reconstructions are measured as `jaxsae eval` measures them
    (`evaluate.ReconstructionSums`: fault testing found float32 sums overflowing here, an
    explained variance of null where eval measured one)."""
    a = jax.tree.map(jnp.asarray, loaded.params)
    b = jax.tree.map(jnp.asarray, params)
    sums_a, sums_b = evaluate.ReconstructionSums(a, loaded.sae), evaluate.ReconstructionSums(b, cfg)
    on = np.zeros(3)
    for x in blocks:
        x = jnp.asarray(x, jnp.float32)
        block_a, block_b, agreement = _compare_block(a, loaded.sae, b, cfg, x)
        sums_a.add_sums(block_a, x.shape[0])
        sums_b.add_sums(block_b, x.shape[0])
        on += np.asarray(jax.device_get(agreement), np.float64)
    ra, rb = sums_a.result(), sums_b.result()
    return {"tokens": ra["tokens"], "l0_topk": ra["l0"], "l0_jumprelu": rb["l0"],
            # (a ratio with nothing to count is null, not 0: fault testing)
            "recall_of_topk_codes": on[2] / on[0] if on[0] else None,
            "precision": on[2] / on[1] if on[1] else None,
            "explained_variance_topk": ra["explained_variance"],
            "explained_variance_jumprelu": rb["explained_variance"],
            "firing_frequency": rb["firing_frequency"]}


def convert_dir(sae_dir: str, data: str, out: str | Path, *, tokens: int | None = None,
                batch_size: int = 4096, hook: str | None = None, overwrite: bool = False,
                drop_norm_above: DropRule = TRAINED, progress: bool = True) -> dict[str, Any]:
    """Converts the TopK SAE in `sae_dir` (calibrated on the `tokens` tokens of `data` before
    its last `tokens`, compared on those last ones; None: 65536, or half the data if that is
    less) and writes it to `out` with convert.json.
    `drop_norm_above`: the tokens left out of both (`jaxsae.data.window.drop_multiple`; by
    default those the SAE's training left out). `progress`: a bar over the three passes."""
    from jaxsae.data import open_for_saes

    outputs.check_target(out, "convert", overwrite=overwrite, inputs=(sae_dir, data))
    loaded = export.load_sae(sae_dir)
    if loaded.sae.activation != "topk":
        raise JaxsaeError(f"{sae_dir}: is a {loaded.cfg_json.get('architecture')} SAE; convert "
                          "takes TopK SAEs (BatchTopK exports as JumpReLU already)")
    source = open_for_saes(data, hook, [loaded])
    given = tokens is not None
    if tokens is None:
        tokens = min(65536, source.n_tokens // 2)
    start = max(0, source.n_tokens - tokens)
    lo = max(0, start - tokens)
    if start - lo <= 0 or tokens == 0:
        if not given:  # (the default: half the data to compare on, the half before to calibrate)
            raise JaxsaeError(f"{data}: {source.n_tokens} token(s) are too few to convert on "
                              "(the thresholds are calibrated on tokens before those the two "
                              "SAEs are compared on: at least 2)")
        raise JaxsaeError(f"{data}: {source.n_tokens} tokens leave none to calibrate on before "
                          f"the last --tokens {tokens}; lower --tokens")
    evaluation = Window.for_saes(source, data, start, saes=[loaded.cfg_json],
                                 rule=drop_norm_above, batch_size=batch_size)
    calibration = Window.dropping(source, lo, start, batch_size=batch_size,
                                  multiple=evaluation.multiple)
    bar = Progress(2 * calibration.tokens + evaluation.tokens, unit="tok", unit_scale=True,
                   enabled=progress, desc="convert")
    threshold = calibrate(loaded.params, loaded.sae, lambda: calibration.blocks(bar.update))
    params, cfg = as_jumprelu(loaded, threshold)
    compared = compare(loaded, params, cfg, evaluation.blocks(bar.update))
    frequency = compared.pop("firing_frequency")
    report = {"sae": str(Path(sae_dir).absolute()), "calibration_tokens": calibration.kept,
              **compared, **evaluation.report()}
    bar.close()
    with outputs.staged_directory(out, "convert", overwrite=overwrite,
                                  inputs=(sae_dir, data)) as staging:
        export.export_sae(params, cfg, staging / "sae",
                          log10_firing=evaluate.log10_firing(frequency),
                          metadata=hub.without_evaluation(loaded.cfg_json.get("metadata", {})),
                          training={"converted_from": str(Path(sae_dir).absolute()),
                                    "k": loaded.sae.k,
                                    **trained_drop(loaded.cfg_json)})
        outputs.atomic_write(staging / "convert.json", outputs.json_text(report))
    return report
