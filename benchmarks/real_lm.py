"""SAEs trained on real language-model activations: CE loss recovered and the SAELens check.

    scripts/real_activations.sh                      # caches SmolLM2-135M layer 15 (~15 min)
    jaxsae train configs/smollm2/topk.yaml           # and configs/smollm2/relu_l1.yaml
    .venv-interop/bin/python benchmarks/real_lm.py runs/smollm2-topk runs/smollm2-relu-l1

For each run directory: the reconstruction metrics of its held-out activations (the run's
eval.json), the SAE spliced into the model over held-out text (`jaxsae eval --model`: CE loss
recovered, KL), and the exported SAE loaded with `sae_lens.SAE.load_from_disk` and run on the
same held-out activations: its reconstruction must match jaxsae's. Needs the PyTorch environment
(.venv-interop: jaxsae[lm] + sae-lens). Prints JSON per SAE and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import machine  # noqa: E402
from jaxsae import evaluate, splice  # noqa: E402
from jaxsae.config import load_config  # noqa: E402
from jaxsae.data import lm as lm_data  # noqa: E402
from jaxsae.data import open_source  # noqa: E402
from jaxsae.export import load_sae  # noqa: E402


def saelens_check(sae_dir: Path, x: np.ndarray, loaded) -> dict:
    """Max |x_hat_saelens - x_hat_jaxsae| relative to the activation norm, and code agreement."""
    import torch
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(x))
        recon = sae.decode(codes).numpy()
    ours_codes, ours = (np.asarray(a) for a in evaluate.encode_decode(
        loaded.params, x, loaded.sae))
    scale = float(np.linalg.norm(x, axis=1).mean())
    return {"saelens_class": type(sae).__name__,
            "saelens_max_recon_diff_rel": float(np.abs(recon - ours).max() / scale),
            "saelens_same_active_latents": float(np.mean((codes.numpy() > 0) == (ours_codes > 0)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories trained on a jaxsae cache")
    parser.add_argument("--text", default="data/smollm2/text/eval.txt", help="held-out text")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens spliced")
    parser.add_argument("--check-tokens", type=int, default=4096,
                        help="held-out activations run through SAELens")
    args = parser.parse_args()

    rows = []
    lm, model_name = None, None
    for run in map(Path, args.runs):
        cfg = load_config(run / "config.yaml")
        loaded = load_sae(run / "sae")
        meta = loaded.cfg_json["metadata"]
        layer, hook = lm_data.parse_hook_name(meta["hook_name"])
        if meta["model_name"] != model_name:
            model_name = meta["model_name"]
            lm = lm_data.load_model(model_name, progress=False)
        held_out = json.loads((run / "eval.json").read_text())
        start = time.perf_counter()
        windows = splice.eval_windows(lm, lm_data.text_files([args.text]),
                                      meta["context_size"], args.tokens, 1)
        [ce] = splice.ce_loss_recovered([loaded], lm, layer, hook, windows, progress=False,
                                        clean_norm_above=cfg.data.drop_norm_above)
        data = open_source(cfg.data)
        x = np.asarray(data.read(data.n_tokens - args.check_tokens, data.n_tokens), np.float32)
        row = {"run": str(run), "architecture": loaded.cfg_json["architecture"],
               "d_sae": loaded.cfg_json["d_sae"], "k": loaded.cfg_json.get("k"),
               "held_out": held_out, "spliced": ce, "splice_seconds": time.perf_counter() - start,
               **saelens_check(run / "sae", x, loaded)}
        print(json.dumps(row), flush=True)
        rows.append(row)

    print(f"\n{json.dumps(machine())}\n")
    print("| SAE | L0 | explained variance | dead | CE clean | CE with SAE | CE zero-ablated "
          "| CE mean-ablated | CE loss recovered | vs mean ablation | KL(clean ‖ SAE) "
          "| KL score | SAELens recon. diff |")
    print("|" + " --- |" * 13)
    for r in rows:
        h, s = r["held_out"], r["spliced"]
        name = f"{r['architecture']}" + (f" k={r['k']}" if r["k"] else "")
        print(f"| {name}, {r['d_sae']} | {h['l0']:.1f} | {h['explained_variance']:.3f} "
              f"| {h['dead_fraction']:.3f} | {s['ce_clean']:.3f} | {s['ce_sae']:.3f} "
              f"| {s['ce_zero_ablation']:.3f} | {s['ce_mean_ablation']:.3f} "
              f"| {s['ce_loss_recovered']:.3f} | {s['ce_loss_recovered_vs_mean_ablation']:.3f} "
              f"| {s['kl_sae']:.3f} | {s['kl_div_score']:.3f} "
              f"| {r['saelens_max_recon_diff_rel']:.1e} |")


if __name__ == "__main__":
    main()
