"""`jaxsae cache` against a plain reference: the whole model run with output_hidden_states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from jaxsae.cli import main
from jaxsae.data import lm as lm_data
from jaxsae.data.shards import ShardSet


def reference_windows(model_dir, texts, context):
    """The windows built by hand: each file tokenised whole, then EOS; BOS + context-1 tokens."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    stream = []
    for f in [texts / "a.txt", texts / "docs" / "b.rst.txt"]:
        stream += tok(f.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = context - 1
    return np.array([[tok.bos_token_id, *stream[i : i + body]]
                     for i in range(0, len(stream) - body + 1, body)])


def reference_hidden(model_dir, ids, *, final_norm=True):
    """hidden_states of the full model: [embeddings, block 0 out, ..., last (after the norm)]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if not final_norm:
        model.model.norm = torch.nn.Identity()
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(ids), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def run_cache(tiny_model, texts, out, *extra, tokens=300, layer=1, context=16):
    return main(["cache", "--model", str(tiny_model), "--layer", str(layer), "--text",
                 str(texts / "a.txt"), str(texts / "docs"), "--tokens", str(tokens),
                 "--context", str(context), "--out", str(out), "--no-progress", *extra])


def test_resid_post_matches_full_model_and_drops_the_first_position(tiny_model, texts, tmp_path):
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--shard-tokens", "128") == 0
    acts = ShardSet(tmp_path / "acts").read(0, 300)
    windows = reference_windows(tiny_model, texts, 16)
    hidden = reference_hidden(tiny_model, windows)
    want = hidden[2][:, 1:].reshape(-1, hidden[2].shape[-1])[:300]  # output of block 1
    np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-5)

    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert [s["n_tokens"] for s in manifest["shards"]] == [128, 128, 44]
    assert manifest["source"] == {
        "model": str(tiny_model), "layer": 1, "hook": "blocks.1.hook_resid_post",
        "text": [str(texts / "a.txt"), str(texts / "docs")], "context": 16,
        "drop_first_position": True, "prepend_bos": True, "model_dtype": "float32"}


def test_keeping_the_first_position_and_resid_pre(tiny_model, texts, tmp_path):
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--hook", "resid_pre",
                     "--no-drop-first-position", "--tokens", "64") == 0
    acts = ShardSet(tmp_path / "acts").read(0, 64)
    hidden = reference_hidden(tiny_model, reference_windows(tiny_model, texts, 16)[:4])
    np.testing.assert_allclose(acts, hidden[1].reshape(-1, hidden[1].shape[-1]),  # block 1 in
                               rtol=1e-5, atol=1e-5)


def test_last_layer_is_the_residual_stream_not_the_final_norm(tiny_model, texts, tmp_path,
                                                              n_layers):
    last = n_layers - 1
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--tokens", "45",
                     layer=last) == 0
    acts = ShardSet(tmp_path / "acts").read(0, 45)
    ids = reference_windows(tiny_model, texts, 16)[:3]
    residual = reference_hidden(tiny_model, ids, final_norm=False)[-1][:, 1:].reshape(-1, 32)
    normed = reference_hidden(tiny_model, ids)[-1][:, 1:].reshape(-1, 32)
    np.testing.assert_allclose(acts, residual, rtol=1e-5, atol=1e-5)
    assert not np.allclose(acts, normed, atol=1e-2)


def test_an_interrupted_cache_resumes_to_the_same_shards(tiny_model, texts, tmp_path,
                                                          monkeypatch):
    assert run_cache(tiny_model, texts, tmp_path / "whole", "--shard-tokens", "70",
                     "--batch-size", "2") == 0

    calls = {"n": 0}
    capture = lm_data.capture

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # the first call reads d_model; five batches (150 tokens) pass
            raise KeyboardInterrupt
        return capture(*args)

    monkeypatch.setattr(lm_data, "capture", flaky)
    out = tmp_path / "resumed"
    assert run_cache(tiny_model, texts, out, "--shard-tokens", "70", "--batch-size", "2") == 130
    assert not out.exists()
    progress = json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())
    assert [s["n_tokens"] for s in progress["shards"]] == [70, 70]

    monkeypatch.setattr(lm_data, "capture", capture)
    read = []
    monkeypatch.setattr(lm_data, "capture", lambda *a: read.append(a[-1].shape) or capture(*a))
    assert run_cache(tiny_model, texts, out, "--shard-tokens", "70", "--batch-size", "2") == 0
    # 140 tokens were kept: the rerun starts at window 140 // 15 = 9, not at the beginning.
    assert sum(shape[0] for shape in read[1:]) == 20 - 9
    np.testing.assert_array_equal(ShardSet(out).read(0, 300),
                                  ShardSet(tmp_path / "whole").read(0, 300))
    assert not (tmp_path / "resumed.partial").exists()
    assert not (out / "progress.json").exists()


def test_rerunning_a_finished_cache_and_bad_input(tiny_model, texts, tmp_path, capsys,
                                                  n_layers):
    out = tmp_path / "acts"
    assert run_cache(tiny_model, texts, out, "--tokens", "30") == 0
    capsys.readouterr()
    assert run_cache(tiny_model, texts, out, "--tokens", "30") == 0
    assert "already cached (30 tokens)" in capsys.readouterr().err
    assert run_cache(tiny_model, texts, out, "--tokens", "30", "--context", "8") == 2
    assert "already exists" in capsys.readouterr().err

    def error(*args, **kw):
        assert run_cache(tiny_model, texts, tmp_path / "bad", *args, **kw) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert f"--layer {n_layers}: {tiny_model} has layers 0..{n_layers - 1}" in error(
        layer=n_layers)
    assert "--context must be at least 2" in error(context=1)
    assert f"--context 300: {tiny_model} takes at most 256 positions" in error(context=300)
    assert main(["cache", "--model", str(tmp_path / "nope"), "--layer", "0", "--text",
                 str(texts), "--tokens", "5", "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["cache", "--model", str(tiny_model), "--layer", "0", "--text",
                 str(tmp_path / "missing.txt"), "--tokens", "5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--text" in err and "missing.txt" in err


def test_text_runs_out(tiny_model, texts, tmp_path, capsys):
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--tokens", "100000") == 0
    n = ShardSet(tmp_path / "acts").n_tokens
    assert n == len(reference_windows(tiny_model, texts, 16)) * 15
    assert f"the text ran out after {n} tokens" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_shard_dtypes(tiny_model, texts, tmp_path, dtype):
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--dtype", dtype, "--tokens",
                     "40") == 0
    data = ShardSet(tmp_path / "acts")
    assert data.manifest.dtype == dtype
    whole = np.asarray(reference_hidden(tiny_model, reference_windows(tiny_model, texts, 16)[:3])
                       [2][:, 1:].reshape(-1, 32)[:40])
    np.testing.assert_allclose(np.asarray(data.read(0, 40), np.float32), whole, rtol=1e-2,
                               atol=1e-2)


def test_a_gguf_file_is_loaded_through_gguf_file(tiny_model, tmp_path, monkeypatch):
    """`--model DIR/NAME.gguf` loads config, tokenizer and weights from DIR with gguf_file=NAME
    (transformers dequantises it; the real SmolLM2 .gguf is used by real_activations.sh)."""
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer,
                transformers.AutoModelForCausalLM):
        def spy(where, *, _load=cls.from_pretrained, _name=cls.__name__, gguf_file=None, **kw):
            calls.append((_name, where, gguf_file))
            return _load(tiny_model, **kw)
        monkeypatch.setattr(cls, "from_pretrained", spy)
    lm = lm_data.load_model(str(gguf), layer=1, progress=False)
    calls = [c for c in calls if c[1] != tiny_model]  # not transformers' own inner calls
    assert calls == [(name, str(tmp_path), gguf.name) for name in
                     ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM")]
    assert lm.n_layers == 3
    with pytest.raises(lm_data.JaxsaeError, match=r"no such \.gguf file"):
        lm_data.load_model(str(tmp_path / "absent.gguf"))
