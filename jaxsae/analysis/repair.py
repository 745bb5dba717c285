"""Projecting absorbed components out of a dictionary (`jaxsae repair SAE_DIR --data DIR --out
DIR`; docs/optimality.md, "Repair").

Absorption is the move of the optimality conditions carried to its end: a child latent's
decoder leans into its parent's direction, and the parent's encoder learns to stay silent
where the child fires (it reads the child's direction negatively). Repair undoes both for
every child / parent pair the taxonomy finds (`jaxsae.analysis.taxonomy`):

- the child's decoder loses its component along the parent's decoder direction
  (W_dec[c] ← W_dec[c] - (W_dec[c]·u_p) u_p): it reconstructs only its own part;
- the parent's encoder loses its components along its children's own input directions (the
  children's encoder columns, made orthogonal to the parent's decoder direction, then to each
  other):
  W_enc[:, p] ← W_enc[:, p] - Σ (W_enc[:, p]·e_c) e_c, so the parent fires on a child's
  tokens as it does where it fires alone, and its decoder puts the parent back.

Everything else is unchanged. Reported before and after on the last --tokens tokens:
L0, MSE and explained variance, and with --truth (data written by `jaxsae synth`) the
ground-truth metrics, absorption and parent recall among them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxsae import evaluate, export, hub, outputs
from jaxsae.data.window import TRAINED, DropRule, Window, describe, trained_drop
from jaxsae.errors import JaxsaeError


def pairs_from_latents(rows: list[dict[str, str]]) -> list[tuple[int, int]]:
    """(child, parent) for every latent latents.csv calls a child."""
    return [(int(r["latent"]), int(r["partner"])) for r in rows
            if r["kind"] == "child" and int(r["partner"]) >= 0]


def repaired(params: dict[str, np.ndarray], pairs: list[tuple[int, int]]
             ) -> dict[str, np.ndarray]:
    """The parameters with each (child, parent) pair's absorbed components projected out."""
    W_dec = np.array(params["W_dec"], np.float64)
    W_enc = np.array(params["W_enc"], np.float64)
    unit = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    new_dec = W_dec.copy()
    for child, parent in pairs:
        u = unit[parent]
        new_dec[child] = W_dec[child] - (W_dec[child] @ u) * u
    new_enc = W_enc.copy()
    children: dict[int, list[int]] = {}
    for child, parent in pairs:
        children.setdefault(parent, []).append(child)
    for parent, kids in children.items():
        # the reference is the parent's decoder direction: its encoder is the contaminated
        # side (it reads the children negatively), and orthogonalising against it would take
        # part of each child's own direction away with it
        u = unit[parent]
        basis: list[np.ndarray] = []
        for c in kids:  # the children's own input directions, orthonormalised
            e = W_enc[:, c] - (W_enc[:, c] @ u) * u
            for b in basis:
                e = e - (e @ b) * b
            if np.linalg.norm(e) > 1e-6:
                basis.append(e / np.linalg.norm(e))
        for b in basis:
            new_enc[:, parent] -= (new_enc[:, parent] @ b) * b
    dtype = params["W_dec"].dtype
    return {**params, "W_dec": new_dec.astype(dtype), "W_enc": new_enc.astype(dtype)}


def repair(sae_dir: str, data: str, out: str | Path, *, tokens: int = 65536,
           batch_size: int = 4096, truth: str | None = None, hook: str | None = None,
           progress: bool = True, overwrite: bool = False,
           drop_norm_above: DropRule = TRAINED) -> dict[str, Any]:
    """Finds the child / parent pairs of `sae_dir` on the last `tokens` of `data` (jaxsae
    analyze, kept in OUT/analysis), writes the repaired SAE to OUT/sae, and OUT/repair.json
    and repair.md with the metrics before and after. `drop_norm_above`: the tokens left out
    (`jaxsae.data.window.drop_multiple`; by default those the SAE's training left out)."""
    from jaxsae.analysis.geometry import analyze
    from jaxsae.data import column_of, open_for_saes, synthetic

    inputs = (sae_dir, data, *([truth] if truth else []))
    outputs.check_target(out, "repair", overwrite=overwrite, inputs=inputs)
    loaded = export.load_sae(sae_dir)
    if "W_enc" not in loaded.params:  # (a tied SAE's export has W_enc = W_dec.T: repaired,
        # it comes out untied)
        raise JaxsaeError(f"{sae_dir}: repair needs an encoder (W_enc); a "
                          f"{loaded.sae.activation} SAE has none")
    source = open_for_saes(data, hook, [loaded], note=False)  # (analyze's says it)
    hook = column_of(source)
    truth_obj = None
    if truth is not None:
        truth_obj = synthetic.load_truth(truth)
        truth_obj.check_data(source, truth, data)
    window = Window.for_saes(source, data, max(0, source.n_tokens - tokens),
                             saes=[loaded.cfg_json], rule=drop_norm_above,
                             batch_size=batch_size)
    with outputs.staged_directory(out, "repair", overwrite=overwrite,
                                  inputs=inputs) as staging:
        analyze(sae_dir, data, staging / "analysis", tokens=tokens, batch_size=batch_size,
                hook=hook, progress=progress, drop_norm_above=window.multiple)
        with open(staging / "analysis" / "latents.csv") as f:
            pairs = pairs_from_latents(list(csv.DictReader(f)))
        params = repaired(loaded.params, pairs)
        both = [(loaded.params, loaded.sae), (params, loaded.sae)]
        sums = [evaluate.ReconstructionSums(p, cfg) for p, cfg in both]
        for block in window.blocks():  # read once for the two
            on_device = jnp.asarray(block)
            for one in sums:
                one.add(on_device)
        report: dict[str, Any] = {"sae": str(Path(sae_dir).absolute()), "tokens": window.kept,
                                  **window.report(),
                                  "pairs": [{"child": c, "parent": p} for c, p in pairs]}
        truths = [{}, {}] if truth_obj is None else evaluate.truth_reports(
            both, source, truth_obj, start=window.start, batch_size=batch_size,
            keep=window.keep_fn)
        for label, one, truth_metrics in zip(("before", "after"), sums, truths, strict=True):
            metrics = one.result()
            frequency = metrics.pop("firing_frequency")  # (the last: the repaired SAE's)
            report[label] = {**metrics, **truth_metrics}
        export.export_sae(params, loaded.sae, staging / "sae",
                          log10_firing=evaluate.log10_firing(frequency),
                          metadata=hub.without_evaluation(loaded.cfg_json.get("metadata", {})),
                          training={"repaired_from": str(Path(sae_dir).absolute()),
                                    "pairs": len(pairs),
                                    **trained_drop(loaded.cfg_json)})
        outputs.atomic_write(staging / "repair.json", outputs.json_text(report))
        outputs.atomic_write(staging / "repair.md", _markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    keys = [k for k in ("l0", "mse", "explained_variance", "absorption", "absorption_full",
                        "parent_recall_alone", "parent_recall_with_child", "mcc")
            if k in report["before"]]
    rows = [{"": label, **{k: report[label][k] for k in keys}} for label in ("before", "after")]
    left_out = describe(report)
    return "\n".join([
        f"# Repair of {report['sae']}", "",
        f"{len(report['pairs'])} child / parent pairs (analysis/latents.csv) had the parent's "
        "component projected out of the child's decoder and the child's direction out of the "
        f"parent's encoder. On the last tokens of the data ({report['tokens']} evaluated"
        f"{'; ' + left_out if left_out else ''}):", "",
        *outputs.markdown_table(rows, ["", *keys]), ""])
