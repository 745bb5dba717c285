"""SynthSAEBench data generation: jaxsae's sparse JAX sampler beside SAELens's generator, on the
same machine, in one run, for the same configuration.

    .venv-interop/bin/python benchmarks/synthsaebench_generator.py [--preset quarter]
        [--batch 16384] [--seconds 20] [--orthogonalize] [--json PATH]

Needs jaxsae and sae-lens in one environment (`.venv-interop`, built by scripts/test.sh).
Both generators build the preset's world without orthogonalising the dictionary (it does not
change the sampling cost; --orthogonalize also times that step for both), then draw batches of
--batch tokens for about --seconds each: tokens x [batch, d] (SAELens: `SyntheticModel.sample`;
jaxsae: `Sampler.sample`, compiled before timing) and the true L0 of what each drew. Prints a
markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

from jaxsae.data import synthsaebench as sb
from jaxsae.outputs import atomic_write, json_text, markdown_table


def saelens_model(spec: sb.SynthSAEBenchSpec, orthogonalize: bool):
    import torch
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
    from sae_lens.synthetic.firing_magnitudes import (
        FoldedNormalMagnitudeConfig,
        LinearMagnitudeConfig,
    )
    from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.hierarchy import HierarchyConfig
    from sae_lens.synthetic.synthetic_model import (
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
    )

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = SyntheticModelConfig(
        num_features=spec.n_features, hidden_dim=spec.d_in,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=spec.zipf_exponent, max_prob=spec.max_prob, min_prob=spec.min_prob),
        hierarchy=HierarchyConfig(
            total_root_nodes=spec.roots, branching_factor=spec.branching,
            max_depth=spec.max_depth, mutually_exclusive_portion=spec.exclusive_portion,
            compensate_probabilities=spec.compensate,
            scale_children_by_parent=spec.scale_children),
        orthogonalization=(OrthogonalizationConfig(num_steps=spec.orthogonalize_steps,
                                                   lr=spec.orthogonalize_lr)
                           if orthogonalize else None),
        correlation=LowRankCorrelationConfig(rank=spec.correlation_rank,
                                             correlation_scale=spec.correlation_scale),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=spec.magnitude_start,
                                                     end=spec.magnitude_end),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=spec.magnitude_std_mean,
                                                          std=spec.magnitude_std_std),
        bias=spec.bias, seed=spec.seed)
    # SAELens's orthogonalisation draws a progress bar whatever the environment says (it
    # passes show_progress=True): kept off the terminal
    with contextlib.redirect_stderr(io.StringIO()):
        return SyntheticModel(cfg)


def rate(draw, batch: int, seconds: float) -> tuple[float, float]:
    """(microseconds per token, mean true L0) over about `seconds` of draws."""
    draw(0)
    tokens, l0s, start, i = 0, [], time.perf_counter(), 1
    while time.perf_counter() - start < seconds:
        l0s.append(draw(i))
        tokens += batch
        i += 1
    return (time.perf_counter() - start) / tokens * 1e6, float(np.mean(l0s))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quarter", choices=sorted(sb.PRESETS))
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--orthogonalize", action="store_true",
                        help="also time orthogonalising the dictionary (both generators)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    import torch

    spec = sb.SynthSAEBenchSpec(preset=args.preset, orthogonalize_steps=0)
    rows, out = [], {"machine": machine(), "preset": args.preset, "batch": args.batch}

    # jaxsae first: torch's OpenMP threads keep spinning for a while after SAELens's draws
    t0 = time.perf_counter()
    truth = sb.build_truth(spec)
    sampler = sb.Sampler(truth, roots=spec.roots, branching=spec.branching,
                         max_depth=spec.max_depth, scale_children=spec.scale_children)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(sampler.sample(jax.random.key(0), args.batch, codes=True))
    jax.block_until_ready(sampler.sample(jax.random.key(0), args.batch))
    compile_s = time.perf_counter() - t0

    def jaxsae_draw(i):
        x, _ = sampler.sample(jax.random.key(i), args.batch)
        x.block_until_ready()
        return np.nan

    us_j, _ = rate(jaxsae_draw, args.batch, args.seconds)
    codes = np.asarray(sampler.sample(jax.random.key(1), args.batch, codes=True)[1])
    l0_j = float((codes > 0).sum(axis=1).mean())
    jaxsae_row = {"us_per_token": us_j, "true_l0": l0_j, "build_s": build,
                  "compile_s": compile_s}

    t0 = time.perf_counter()
    model = saelens_model(spec, orthogonalize=False)
    build = time.perf_counter() - t0

    def saelens_draw(_):
        with torch.no_grad():
            _, codes = model.sample_with_features(args.batch)
        return float((codes > 0).sum(dim=1).float().mean())

    us, l0 = rate(saelens_draw, args.batch, args.seconds)
    out["saelens"] = {"us_per_token": us, "true_l0": l0, "build_s": build}
    rows.append(["SAELens " + _saelens_version(), f"{us:.1f}", f"{1e6 / us:,.0f}", f"{l0:.2f}",
                 f"{build:.1f}", "1.0x"])

    out["jaxsae"] = {**jaxsae_row, "speedup": us / us_j}
    rows.append(["jaxsae", f"{us_j:.1f}", f"{1e6 / us_j:,.0f}", f"{l0_j:.2f}",
                 f"{jaxsae_row['build_s']:.1f} (+{compile_s:.0f} compile)", f"{us / us_j:.1f}x"])
    print(f"# SynthSAEBench generator, preset {args.preset} ({spec.n_features} features in "
          f"d {spec.d_in}), batches of {args.batch}\n")
    columns = ["generator", "µs / token", "tokens / s", "true L0", "build s", "speed"]
    print("\n".join(markdown_table([dict(zip(columns, r, strict=True)) for r in rows],
                                    columns)))
    if args.orthogonalize:
        orth = {}
        t0 = time.perf_counter()
        saelens_model(sb.SynthSAEBenchSpec(preset=args.preset), orthogonalize=True)
        orth["saelens_s"] = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        rows_ = rng.standard_normal((spec.n_features, spec.d_in))
        rows_ /= np.linalg.norm(rows_, axis=1, keepdims=True)
        t0 = time.perf_counter()
        sb.orthogonalize(rows_, 100, 3e-4)
        orth["jaxsae_s"] = time.perf_counter() - t0
        out["orthogonalize"] = orth
        print(f"\northogonalising the dictionary (100 Adam steps): SAELens "
              f"{orth['saelens_s']:.1f} s (world build included), jaxsae {orth['jaxsae_s']:.1f} s")
    print(f"\n{out['machine']}")
    if args.json:
        atomic_write(Path(args.json), json_text(out))


def _saelens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


if __name__ == "__main__":
    main()
