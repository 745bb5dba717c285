"""Every preset under configs/ starts with its launch command, loads, and trains a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxsae.config import load_config
from jaxsae.data.shards import ShardWriter
from jaxsae.train import train

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "bench")
BENCHES = sorted((ROOT / "configs" / "bench").glob("*.yaml"))
"""The default run loads every bench preset and builds each arm's config; the short runs (20 to
150 s each on 2 cores: every arm compiles its own step) are marked slow. run_bench itself is
covered by tests/test_bench.py, the synthsaebench data and metrics by
tests/test_synthsaebench.py."""


def test_presets_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in PRESETS}
    assert "quickstart.yaml" in names
    for term in ("l1", "group_l1_l2", "intra_group_orthogonality", "matryoshka",
                 "decoder_cosine", "jumprelu_l0", "topk_auxk"):
        assert f"penalties/{term}.yaml" in names
    for arch in ("gated", "matching_pursuit", "jumprelu_target_l0"):
        assert f"architectures/{arch}.yaml" in names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_preset_launch_line_and_short_run(preset, tmp_path):
    first = preset.read_text().splitlines()[0]
    assert first == f"# jaxsae train {preset.relative_to(ROOT).as_posix()}"
    cfg = load_config(preset)
    overrides = [f"data.path={tmp_path / 'data'}"]
    if cfg.data.generate is None:  # real activations: the preset says how to make them
        assert "# Data: scripts/" in preset.read_text(), "say how to make the data"
        rng = np.random.default_rng(0)
        with ShardWriter(tmp_path / "data", 576, shard_tokens=8192) as writer:
            writer.write(rng.normal(size=(12288, 576)).astype(np.float32))
        if cfg.data.target is not None:  # a transcoder's targets, paired row by row
            with ShardWriter(tmp_path / "target", 576, shard_tokens=8192) as writer:
                writer.write(rng.normal(size=(12288, 576)).astype(np.float32))
            overrides.append(f"data.target={tmp_path / 'target'}")
        overrides.append("sae.d_sae=576")  # (their 4608 latents: export and step time only)
    else:  # presets generate their data when it is missing
        overrides.append("data.generate.tokens=24576")
    batch = 256
    # explicit warm-ups longer than 6 steps are refused (lowered, as a smoke test would)
    overrides += [f"loss.{i}.warmup_steps=1" for i, t in enumerate(cfg.loss) if t.warmup_steps]
    short = load_config(preset, [
        *overrides, f"run_dir={tmp_path / 'run'}", "data.eval_tokens=4096",
        "data.shuffle_buffer=8192", f"optim.batch_size={batch}",
        f"optim.total_tokens={batch * 6}", "optim.warmup_steps=1", "checkpoint.every_steps=3",
        "log.curves=false"])  # (drawn where tested: test_curves.py)
    result = train(short, progress=False)
    assert result.step == 6
    assert (result.sae_dir / "cfg.json").is_file()


@pytest.mark.parametrize("config", BENCHES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_bench_preset_launch_line_and_arms(config, tmp_path):
    from jaxsae.bench import load_bench_config

    first = config.read_text().splitlines()[0]
    assert first == f"# jaxsae bench {config.relative_to(ROOT).as_posix()}"
    cfg = load_bench_config(config, [f"out={tmp_path / 'bench'}"])
    configs = cfg.arm_configs()  # each arm checked as `jaxsae train` checks a config
    assert set(configs) == set(cfg.arms)


@pytest.mark.slow
@pytest.mark.parametrize("config", BENCHES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_bench_preset_short_run(config, tmp_path):
    from jaxsae.bench import load_bench_config, run_bench

    small = ["base.data.generate.preset=tiny"] if "synthsaebench" in config.read_text() else []
    # explicit warm-ups longer than 6 steps are refused (lowered, as a smoke test would)
    arms = yaml.safe_load(config.read_text())["arms"]
    small += [f"arms.{name}.loss.{i}.warmup_steps=1" for name, arm in arms.items()
              for i, t in enumerate((arm or {}).get("loss") or []) if t.get("warmup_steps")]
    cfg = load_bench_config(config, [
        f"out={tmp_path / 'bench'}", f"base.data.path={tmp_path / 'data'}", "seeds=[0]",
        "base.data.generate.tokens=24576", "base.data.eval_tokens=4096", *small,
        "base.optim.batch_size=256", "base.optim.total_tokens=1536", "base.optim.warmup_steps=1"])
    rows = run_bench(cfg, progress=False, log=lambda m: None)
    assert {r["arm"] for r in rows} == set(cfg.arms)
    assert (tmp_path / "bench" / "results.md").is_file()
