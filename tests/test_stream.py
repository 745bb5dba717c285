"""data.stream: generated tokens drawn as training reads them (jaxsae.data.generated).

A streamed run must be the run on the directory `jaxsae synth` writes for the same spec (same
batches, same result), resume exactly, generate each block once per epoch and only the blocks
of the lanes a process reads, and refuse what it cannot do in one line."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import yaml
from conftest import small_config_dict, train_until_crash

from jaxsae import cli, tensorfile
from jaxsae.config import DataConfig, config_from_dict
from jaxsae.data import GeneratedSource, open_source, synthetic
from jaxsae.data.generated import stream_spec
from jaxsae.data.loader import Loader
from jaxsae.errors import ConfigError, DataError, JaxsaeError
from jaxsae.train import train

GENERATE = {"kind": "superposition", "n_features": 48, "d_in": 16, "mean_l0": 3.0, "seed": 5}


def _stream_config(run_dir, total_tokens=256 * 24, **data):
    tree = small_config_dict("", run_dir, data={"generate": GENERATE, "stream": True,
                                                "eval_tokens": 1024, **data})
    tree["data"].pop("path")
    tree["optim"]["total_tokens"] = total_tokens
    return config_from_dict(tree)


def _weights(run) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)
            for k, v in tensorfile.read(run.sae_dir / "sae_weights.safetensors").items()}


def test_a_streamed_run_is_the_run_on_the_written_data_and_resumes_exactly(tmp_path,
                                                                           monkeypatch):
    cfg = _stream_config(tmp_path / "stream")
    source = open_source(cfg.data, train_tokens=cfg.optim.total_tokens)
    n_train = source.n_tokens - cfg.data.held_out(source.n_tokens)
    assert n_train == cfg.optim.total_tokens  # sized for the run: no token drawn twice
    streamed = train(cfg, progress=False, log=lambda m: None)
    assert not any(tmp_path.glob("**/*.npy"))  # nothing written but the run's own files
    assert {"mcc", "uniqueness", "sb_f1"} <= set(streamed.eval)  # the truth came with it

    # The same tokens written by `jaxsae synth`, read with the streamed run's chunks.
    written = synthetic.generate({**GENERATE, "tokens": source.n_tokens}, tmp_path / "data",
                                 progress=False)
    chunk = Loader(source, batch_size=256, buffer_tokens=cfg.data.shuffle_buffer, seed=0,
                   lanes=cfg.data.lanes, stop=n_train).chunk_tokens
    on_disk = config_from_dict(small_config_dict(
        written, tmp_path / "disk", data={"generate": GENERATE, "eval_tokens": 1024}))
    from_disk = train(on_disk, progress=False, log=lambda m: None,
                      make_loader=functools.partial(Loader, chunk_tokens=chunk))
    assert streamed.eval == from_disk.eval
    for name, w in _weights(streamed).items():
        np.testing.assert_array_equal(w, _weights(from_disk)[name], err_msg=name)

    # A crash after the step-8 checkpoint; the same config resumes to the same result.
    crashed = _stream_config(tmp_path / "crashed")
    train_until_crash(crashed, at_batch=13)
    resumed = train(crashed, progress=False, log=lambda m: None)
    assert resumed.eval == streamed.eval
    for name, w in _weights(streamed).items():
        np.testing.assert_array_equal(w, _weights(resumed)[name], err_msg=name)

    # What would change the streamed data is refused on resume, naming it.
    changed = _stream_config(tmp_path / "stream", generate={**GENERATE, "seed": 6})
    with pytest.raises(JaxsaeError, match=r"changed data\.generate\.seed \(5 in the "
                                          r"checkpoint, 6 now"):
        train(changed, progress=False, log=lambda m: None)
    # the same generator written otherwise: every default, and the size the run resolved
    # (fault testing: refused as a change of data.generate)
    spelt = {**synthetic.spec_dict(synthetic.parse_spec(GENERATE)[1]), "kind": "superposition",
             "tokens": source.n_tokens}
    assert spelt != GENERATE
    assert train(_stream_config(tmp_path / "stream", generate=spelt), progress=False,
                 log=lambda m: None).eval == streamed.eval
    longer = _stream_config(tmp_path / "stream", total_tokens=256 * 32)
    with pytest.raises(JaxsaeError, match=r"data\.generate\.tokens"):
        train(longer, progress=False, log=lambda m: None)

    # Nor is it exported from other tokens: a sampler other than the checkpoint's (fault
    # testing: a run streamed by version 1 was evaluated on version 2's tokens)
    from jaxsae.data.generated import GeneratedSource
    from jaxsae.finish import export_checkpoint

    drawn = GeneratedSource.__init__

    def another_version(self, spec):
        drawn(self, spec)
        self.sampler = 2

    monkeypatch.setattr(GeneratedSource, "__init__", another_version)
    with pytest.raises(DataError, match=r"drawn by version 1 of the superposition sampler and "
                                        r"this jaxsae draws version 2 .*; export it with the "
                                        r"jaxsae that trained it"):
        export_checkpoint(tmp_path / "stream", tmp_path / "exported", log=lambda m: None)
    assert not (tmp_path / "exported").exists()


def test_a_checkpoint_drawn_by_another_sampler_version_is_refused(tmp_path):
    """A generator with a versioned sampler (synthsaebench) records its version in the
    loader's checkpointed state; a checkpoint without it (version 1) or of another version
    does not resume: the same seed now draws other tokens."""
    from jaxsae.data.synthsaebench import SAMPLER_VERSION
    from jaxsae.train import _check_loader_state

    generate = {"kind": "synthsaebench", "preset": "tiny", "orthogonalize_steps": 0,
                "tokens": 8192, "seed": 1}
    cfg = _stream_config(tmp_path / "run", generate=generate, eval_tokens=1024)
    source = open_source(cfg.data, train_tokens=cfg.optim.total_tokens)
    n_train = source.n_tokens - cfg.data.held_out(source.n_tokens)
    state = Loader(source, batch_size=cfg.optim.batch_size, buffer_tokens=4096, seed=0,
                   lanes=cfg.data.lanes, stop=n_train).state()
    assert state["sampler"] == SAMPLER_VERSION
    _check_loader_state(state, cfg, source, n_train, tmp_path)  # the same version resumes
    for old in ({k: v for k, v in state.items() if k != "sampler"}, {**state, "sampler": 99}):
        version = old.get("sampler", 1)
        with pytest.raises(JaxsaeError, match=rf"version {version} of the synthsaebench "
                                              rf"sampler .* version {SAMPLER_VERSION}"):
            _check_loader_state(old, cfg, source, n_train, tmp_path)
    # generators without a versioned sampler record nothing
    plain = open_source(_stream_config(tmp_path / "plain").data, train_tokens=256 * 24)
    assert "sampler" not in Loader(plain, batch_size=256, buffer_tokens=4096, seed=0,
                                   lanes=cfg.data.lanes).state()


def test_each_block_is_generated_once_per_epoch_and_only_for_the_lanes_read(monkeypatch):
    """Chunks are whole blocks where the data allows, so a lane's chunk costs one block; a
    process owning half the lanes generates only its half of the blocks."""
    spec = synthetic.SuperpositionSpec(n_features=16, d_in=8, tokens=32 * synthetic.BLOCK_TOKENS,
                                       mean_l0=2.0, seed=1)
    made: list[int] = []
    real = synthetic.block_rows

    def counted(spec, truth, block, n, *, codes):
        made.append(block)
        return real(spec, truth, block, n, codes=codes)

    monkeypatch.setattr(synthetic, "block_rows", counted)
    seen = []
    for owned in ([0, 1, 2, 3], [4, 5, 6, 7]):
        source = GeneratedSource(spec)
        loader = Loader(source, batch_size=4096, buffer_tokens=8 * 2 * synthetic.BLOCK_TOKENS,
                        seed=0, lanes=8, owned_lanes=owned)
        assert loader.chunk_tokens == synthetic.BLOCK_TOKENS
        batches = loader.batches()
        for _ in range(spec.tokens // 4096):  # one epoch
            next(batches)
        loader.close()
        seen.append(sorted(made))
        made.clear()
    first, second = seen
    # (the loader reads one window ahead: the next epoch's first blocks may be generated too)
    assert set(first) | set(second) == set(range(32))
    assert not set(first) & set(second)
    assert all(b % 8 < 4 for b in first) and all(b % 8 >= 4 for b in second)
    for blocks in seen:
        assert len(blocks) - len(set(blocks)) <= 4, "a block generated twice in one epoch"


def test_the_block_cache_keeps_the_newest_blocks_within_its_budget(monkeypatch):
    """Regenerated blocks past the budget are dropped, oldest first; the block just asked for
    is kept whatever its size; a block asked for again is served, not regenerated."""
    made: list[int] = []

    def fake(spec, truth, block, n, *, codes):
        made.append(block)
        x = np.zeros(500 if block == 5 else 250, np.float32)
        return x, None, np.zeros(10, np.int64) if codes else None

    monkeypatch.setattr(synthetic, "block_rows", fake)
    spec = synthetic.SuperpositionSpec(n_features=16, d_in=8, tokens=8 * synthetic.BLOCK_TOKENS)
    cache = synthetic._Blocks(budget=2500)  # two blocks of 1000 bytes, or one with codes
    for block in (0, 1, 2, 1):
        cache.get(spec, {}, block, codes=False)
    assert made == [0, 1, 2] and list(cache._entries) == [2, 1]
    cache.get(spec, {}, 3, codes=True)  # 1080 bytes: 1 and 3 fit, 2 goes
    assert list(cache._entries) == [1, 3]
    cache.get(spec, {}, 5, codes=False)  # 2000 bytes: both others go
    assert list(cache._entries) == [5]
    tiny = synthetic._Blocks(budget=10)
    for block in (0, 1):
        assert tiny.get(spec, {}, block, codes=False)[0].nbytes == 1000
    assert list(tiny._entries) == [1]


def test_the_streamed_tokens_are_the_written_ones(tmp_path):
    spec = synthetic.SuperpositionSpec(n_features=20, d_in=6, tokens=40000, seed=2,
                                       shard_tokens=7000, dtype="float16")
    written = open_source(DataConfig(path=str(synthetic.write(spec, tmp_path / "d",
                                                              progress=False))))
    streamed = GeneratedSource(spec)
    for lo, hi in [(0, 40000), (16000, 16500), (39999, 40000), (5, 5)]:
        np.testing.assert_array_equal(streamed.read(lo, hi), written.read(lo, hi))
    with pytest.raises(IndexError):
        streamed.read(0, 40001)


def test_the_printed_synth_command_writes_the_tokens_the_run_evaluated(tmp_path, capsys):
    """(fault testing: `jaxsae synth` with data.generate's settings and its default --tokens
    wrote other held-out tokens: a last block shorter than the others is drawn otherwise)"""
    import json
    import re

    tree = small_config_dict("", tmp_path / "run", data={"generate": GENERATE, "stream": True,
                                                         "eval_tokens": 1024})
    tree["data"].pop("path")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    hint = capsys.readouterr().out.split("the data was streamed")[1]
    tokens, held = re.findall(r"--tokens (\d+)", hint)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in GENERATE.items() if k != "kind"]
    assert cli.main(["synth", "--out", str(tmp_path / "d"), "--no-progress",
                     GENERATE["kind"], *flags, "--tokens", tokens]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run" / "sae"), "--data", str(tmp_path / "d"),
                     "--truth", str(tmp_path / "d"), "--tokens", held, "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    trained = json.loads((tmp_path / "run" / "eval.json").read_text())
    for key in ("tokens", "l0", "explained_variance", "mcc"):
        assert got[key] == pytest.approx(trained[key], rel=1e-5), key


def test_settings_that_draw_non_finite_tokens_are_refused_when_streamed(tmp_path):
    """(they reached training, which failed at step 0 advising a lower optim.lr, and left its
    run directory behind)"""
    huge = _stream_config(tmp_path / "run", generate={**GENERATE, "magnitude_mean": 3e38})
    with pytest.raises(DataError, match=r"superposition: the settings drew non-finite values"):
        train(huge, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # (what the user saw printed)
def test_streamed_values_beyond_float16_are_refused_naming_the_settings(tmp_path):
    """(fault testing: streamed float16 tokens beyond its range became inf, with numpy's
    overflow warning, and the run was refused advising to repair the data or to skip the
    non-finite steps, where `jaxsae synth` refuses to write them.) The settings are refused,
    naming what to lower, or float32."""
    big = _stream_config(tmp_path / "run", generate={**GENERATE, "magnitude_mean": 1e5,
                                                     "dtype": "float16"})
    with pytest.raises(DataError, match=r"^superposition: the settings drew values beyond "
                       r"float16's range \(\|x\| > 65504\) in tokens .*; lower the "
                       r"magnitudes, or use dtype float32$"):
        train(big, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("train_tokens", [256, 6144, 1_000_003, 10**9])
@pytest.mark.parametrize("eval_tokens", ["auto", 0, 1024])
def test_streamed_data_is_sized_for_the_run(train_tokens, eval_tokens):
    held_out = DataConfig(eval_tokens=eval_tokens).held_out
    n = stream_spec(GENERATE, train_tokens, held_out).tokens
    assert n - held_out(n) == train_tokens
    assert stream_spec({**GENERATE, "tokens": 5000}, train_tokens, held_out).tokens == 5000


@pytest.mark.parametrize(("data", "culprit"), [
    ({"stream": True}, "data.generate"),
    ({"stream": True, "generate": GENERATE, "path": "somewhere"}, "data.path"),
    ({"stream": True, "generate": GENERATE, "target": "t"}, "data.target"),
])
def test_stream_config_errors_name_the_key(data, culprit):
    tree = small_config_dict("", "run", data=data)
    if "path" not in data:
        tree["data"].pop("path")
    with pytest.raises(ConfigError, match=culprit):
        config_from_dict(tree)


def test_transcoder_pairs_are_not_streamed_and_the_cli_says_so(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    tree = small_config_dict("", tmp_path / "run", data={
        "stream": True, "generate": {"kind": "transcoder", "n_features": 8, "d_in": 4,
                                     "d_out": 4}})
    tree["data"].pop("path")
    cfg_file.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(cfg_file), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.stream" in err and "transcoder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    # written (not streamed) without data.target: refused before anything is written (fault
    # testing: the pairs were written, then refused as if the truth were another data's)
    tree = small_config_dict(tmp_path / "pairs", tmp_path / "run2", data={
        "generate": {"kind": "transcoder", "n_features": 8, "d_in": 4, "d_out": 6}})
    cfg_file.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(cfg_file), "--no-progress"]) == 2
    assert (f"data.target: the transcoder generator writes pairs; train a transcoder on them "
            f"with data.target: {tmp_path / 'pairs'}/target") in capsys.readouterr().err
    assert not (tmp_path / "pairs").exists()
