"""Downstream evaluation: an SAE spliced into the language model it was trained on.

The SAE's reconstruction replaces the activation at its hook, and the model's next-token loss is
compared with the clean model and with the activation ablated (the SAELens / SAEBench
definitions):

    ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    kl_div_score      = (KL_zero - KL_sae) / KL_zero,   KL_v = KL(p_clean || p_v) per token

Losses are in nats per predicted token. Windows are built as for `jaxsae cache`; with
`drop_first_position` (the default, as in caching) position 0, the attention sink the SAE never
saw in training, is left clean, and every figure counts only the predictions made from the
spliced positions. With `clean_norm_above` (by default the SAE's training
data.drop_norm_above), later sink positions are left clean too. Mean ablation uses the mean
activation over the spliced positions; L0 and explained variance are measured on the
activations the SAE replaced.

A transcoder reads one point (its `read_hook`, e.g. the MLP's input) and its output replaces
another (the MLP's output); the ablations replace that same point, and explained variance is
of the replaced activation.

The SAE runs through `jaxsae.sae` (JAX); the model through PyTorch (the optional extra `lm`).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import evaluate
from jaxsae.data import lm as lm_data
from jaxsae.errors import JaxsaeError
from jaxsae.export import LoadedSAE
from jaxsae.progress import Progress


def eval_windows(lm: lm_data.LanguageModel, files: Sequence[Path], context: int, tokens: int,
                 first: int) -> np.ndarray:
    """The first windows [n, context] of the text files, enough for `tokens` evaluated
    positions."""
    # (at most sys.maxsize windows: fault testing, --tokens 10^21 was islice's traceback;
    # the text runs out long before)
    n = min(-(-tokens // (context - first)), sys.maxsize)
    windows = list(itertools.islice(lm_data.token_windows(lm, files, context), n))
    if not windows:
        raise JaxsaeError(f"--text {' '.join(map(str, files))}: fewer than {context} tokens")
    return np.stack(windows)


def ce_loss_recovered(saes: Sequence[LoadedSAE], lm: lm_data.LanguageModel, layer: int,
                      hook: str, windows: np.ndarray, *, drop_first_position: bool = True,
                      clean_norm_above: float | None = None, batch_size: int = 8,
                      progress: bool = True, reuse_prefix: bool = True,
                      read_hook: str | None = None) -> list[dict[str, Any]]:
    """CE loss recovered, KL and reconstruction metrics of each SAE over `windows` [n, T]; the
    clean and ablated passes are shared, so a family costs one more pass per batch per SAE.
    The blocks before the hook run once per batch (in the clean pass): every spliced pass
    starts from their recorded output (`reuse_prefix` False: each pass runs the whole model,
    the reference this is tested against).

    Transcoders: `read_hook` (e.g. mlp_in) is what they read and `hook` (mlp_out) what their
    output replaces; the ablations replace `hook` too. For SAEs both are `hook`.

    `clean_norm_above`: activations whose norm (at the read hook) is above this multiple of
    the median norm (attention sinks beyond position 0) are left clean in every variant, as
    training with data.drop_norm_above never showed them to the SAE; `clean_positions` counts
    them."""
    import torch

    lm_data.check_layer(lm, layer)
    read_hook = hook if read_hook is None else read_hook
    first = 1 if drop_first_position else 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    bar = Progress(len(batches) * (4 + len(saes)), unit="pass", enabled=progress,
               desc="CE loss recovered")

    # The activations at the evaluated positions: the median norm of what the SAEs read (for
    # clean_norm_above) and the mean of what they replace (for mean ablation, over the
    # positions that are spliced).
    inputs, outputs = [], []
    for ids in batches:
        got = lm_data.capture(lm, layer, tuple(dict.fromkeys((read_hook, hook))), ids)
        read, replaced = (got[0], got[-1])  # the same array for an SAE
        read, replaced = read[:, first:], replaced[:, first:]
        for loaded in saes:
            what = "SAE" if loaded.d_out is None else "transcoder"
            widths = (("d_in", loaded.d_in, read_hook, read.shape[-1]),
                      ("d_out", loaded.d_out or loaded.d_in, hook, replaced.shape[-1]))
            for name, want, point, have in widths:
                if want != have:
                    raise JaxsaeError(f"the {what} has {name} {want}, but {lm.name} has "
                                      f"{have} dimensions at {lm_data.hook_name(layer, point)}")
        inputs.append(read.reshape(-1, read.shape[-1]))
        outputs.append(replaced.reshape(-1, replaced.shape[-1]))
        bar.update()
    norms = np.linalg.norm(np.concatenate(inputs), axis=1)
    limit = None if clean_norm_above is None else clean_norm_above * float(np.median(norms))
    spliced_rows = norms <= limit if limit is not None else np.ones(len(norms), bool)
    if not spliced_rows.any():  # (fault testing: the mean of nothing, then a traceback; past
        # it, CE recovered 1.0 and KL 0 for SAEs never spliced in)
        raise JaxsaeError(f"--clean-norm-above {clean_norm_above:g}: every one of the "
                          f"{len(norms):,} evaluated positions is above {clean_norm_above:g}x "
                          "the median norm; nothing would be spliced")
    mean = np.concatenate(outputs)[spliced_rows].astype(np.float64).mean(0)
    del inputs, outputs

    seen: list[list[np.ndarray]] = [[] for _ in saes]
    transcoders = read_hook != hook

    def reconstructor(i: int):
        params = jax.tree.map(jnp.asarray, saes[i].params)

        def reconstruct(inp, part):
            flat = inp.float().cpu().numpy().reshape(-1, inp.shape[-1])
            rows = flat if not transcoders else np.concatenate(
                [flat, part.float().cpu().numpy().reshape(-1, part.shape[-1])], axis=1)
            seen[i].append(rows if limit is None
                           else rows[np.linalg.norm(flat, axis=1) <= limit])
            _, x_hat = evaluate.encode_decode(params, jnp.asarray(flat), saes[i].sae)
            return torch.from_numpy(np.array(x_hat)).reshape(part.shape)

        return reconstruct

    replacements = {
        "zero_ablation": lambda inp, part: torch.zeros_like(part),
        "mean_ablation": lambda inp, part: torch.as_tensor(mean).expand_as(part),
        **{f"sae{i}": reconstructor(i) for i in range(len(saes))},
    }
    sums = dict.fromkeys(["ce_clean", *(f"ce_{k}" for k in replacements),
                          *(f"kl_{k}" for k in replacements)], 0.0)
    predicted = 0
    for ids in batches:
        targets = torch.as_tensor(ids[:, first + 1 :], device=lm.device)
        with lm_data.recording_prefix(lm, layer) as prefix:
            clean = _log_probs(lm, ids, first)
        sums["ce_clean"] += _nll(clean, targets)
        bar.update()
        for name, replace in replacements.items():
            box: dict[str, Any] = {}

            def splice(x, replace=replace, box=box):
                part = x[:, first:]
                inp = box["read"][:, first:] if transcoders else part
                new = replace(inp, part).to(dtype=x.dtype, device=x.device)
                if limit is not None:  # attention sinks stay as they are
                    new = torch.where(inp.float().norm(dim=-1, keepdim=True) > limit, part, new)
                out = x.clone()
                out[:, first:] = new
                return out

            reuse = (lm_data.reusing_prefix(lm, layer, prefix) if reuse_prefix
                     else contextlib.nullcontext())
            reading = (lm_data.hooked(lm, layer, read_hook, lambda x, box=box: box.update(read=x))
                       if transcoders else contextlib.nullcontext())
            with reading, lm_data.hooked(lm, layer, hook, splice), reuse:
                spliced = _log_probs(lm, ids, first)
            sums[f"ce_{name}"] += _nll(spliced, targets)
            sums[f"kl_{name}"] += float((clean.exp() * (clean - spliced)).sum())
            bar.update()
        predicted += targets.numel()
    bar.close()

    if not predicted:  # (eval's --context check keeps a window able to predict; a guard)
        raise JaxsaeError("no spliced position predicts a next token: lengthen --context")
    m = {k: v / predicted for k, v in sums.items()}
    shared = {"model": lm.name, "hook": lm_data.hook_name(layer, hook),
              **({"hook_in": lm_data.hook_name(layer, read_hook)} if transcoders else {}),
              "sequences": len(windows), "predicted_tokens": predicted,
              "clean_positions": int(np.sum(~spliced_rows)), "ce_clean": m["ce_clean"]}
    results = []
    for i, loaded in enumerate(saes):
        ce, kl = m[f"ce_sae{i}"], m[f"kl_sae{i}"]
        out = {**shared, "ce_sae": ce, "ce_zero_ablation": m["ce_zero_ablation"],
               "ce_mean_ablation": m["ce_mean_ablation"], "kl_sae": kl,
               "kl_zero_ablation": m["kl_zero_ablation"],
               "kl_mean_ablation": m["kl_mean_ablation"],
               "ce_loss_recovered": _score(m["ce_zero_ablation"], ce, m["ce_clean"]),
               "ce_loss_recovered_vs_mean_ablation": _score(m["ce_mean_ablation"], ce,
                                                            m["ce_clean"]),
               "kl_div_score": _score(m["kl_zero_ablation"], kl, 0.0)}
        recon = evaluate.reconstruction_metrics(loaded.params, loaded.sae, seen[i],
                                                d_in=loaded.d_in)
        recon.pop("firing_frequency")
        results.append({**out, **recon})
    return results


def _log_probs(lm: lm_data.LanguageModel, ids: np.ndarray, first: int):
    """log p(next token) [B, T-1-first, V] in float32 for the predictions from positions first.."""
    import torch

    with torch.inference_mode():
        logits = lm.model(input_ids=torch.as_tensor(ids, device=lm.device), use_cache=False).logits
    return torch.log_softmax(logits[:, first:-1].float(), dim=-1)


def _nll(log_probs, targets) -> float:
    return float(-log_probs.gather(-1, targets[..., None]).sum())


def _score(ablated: float, sae: float, clean: float) -> float:
    # (+ 0.0: an SAE that is the ablation scores 0, not -0.0 as the division printed)
    return (ablated - sae) / (ablated - clean) + 0.0 if ablated != clean else float("nan")
