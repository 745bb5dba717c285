"""`jaxsae cache` against a plain reference: the whole model run with output_hidden_states."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxsae.cli import main
from jaxsae.data import lm as lm_data
from jaxsae.data.shards import ShardSet
from jaxsae.runlock import RunLock


def reference_windows(model_dir, texts, context, **load):
    """The windows built by hand: each file tokenised whole, then EOS; BOS + context-1 tokens."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, **load)
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
    """`jaxsae cache` with these defaults; a flag in `extra` replaces its default (a flag
    given twice is refused)."""
    flags = {"--layer": str(layer), "--tokens": str(tokens), "--context": str(context)}
    for flag in set(flags) & set(extra):
        flags.pop(flag)
    defaults = [word for pair in flags.items() for word in pair]
    return main(["cache", "--model", str(tiny_model), "--text", str(texts / "a.txt"),
                 str(texts / "docs"), *defaults, "--out", str(out), "--no-progress", *extra])


def test_resid_post_matches_full_model_and_drops_the_first_position(tiny_model, texts, tmp_path):
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--shard-tokens", "128") == 0
    acts = ShardSet(tmp_path / "acts").read(0, 300)
    windows = reference_windows(tiny_model, texts, 16)
    hidden = reference_hidden(tiny_model, windows)
    want = hidden[2][:, 1:].reshape(-1, hidden[2].shape[-1])[:300]  # output of block 1
    np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-5)

    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert [s["n_tokens"] for s in manifest["shards"]] == [128, 128, 44]
    read = manifest["source"].pop("inputs")  # what was read, each file with its stamp
    assert [f[0] for f in read["files"]] == [str(texts / "a.txt"),
                                             str(texts / "docs" / "b.rst.txt")]
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
    # 140 tokens were kept: window 140 // 15 = 9 is next, and the rerun starts at the first
    # window of its batch (8), batched as the uninterrupted run was, not at the beginning.
    assert sum(shape[0] for shape in read[1:]) == 20 - 8
    assert [shape[0] for shape in read[1:]] == [2] * 6
    np.testing.assert_array_equal(ShardSet(out).read(0, 300),
                                  ShardSet(tmp_path / "whole").read(0, 300))
    assert not (tmp_path / "resumed.partial").exists()
    assert not (out / "progress.json").exists()

    # (fault testing: a text file rewritten between the interruption and the rerun, to the
    # same size, was resumed: shards of the old text, then of the new) A rewritten file, its
    # content here unchanged but its time new, starts the cache afresh.
    calls["n"] = 0
    monkeypatch.setattr(lm_data, "capture", flaky)
    again = tmp_path / "again"
    assert run_cache(tiny_model, texts, again, "--shard-tokens", "70", "--batch-size", "2") == 130
    text = texts / "a.txt"
    before = text.stat()
    try:
        os.utime(text, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        read.clear()
        monkeypatch.setattr(lm_data, "capture",
                            lambda *a: read.append(a[-1].shape) or capture(*a))
        assert run_cache(tiny_model, texts, again, "--shard-tokens", "70",
                         "--batch-size", "2") == 0
    finally:
        os.utime(text, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert sum(shape[0] for shape in read[1:]) == 20  # from the first window
    np.testing.assert_array_equal(ShardSet(again).read(0, 300),
                                  ShardSet(tmp_path / "whole").read(0, 300))

    # (fault testing: an interrupted cache rerun with fewer --tokens published every token the
    # interrupted one had written) Another --tokens starts afresh, and writes exactly that many.
    calls["n"] = 0
    monkeypatch.setattr(lm_data, "capture", flaky)
    fewer = tmp_path / "fewer"
    assert run_cache(tiny_model, texts, fewer, "--shard-tokens", "70", "--batch-size", "2") == 130
    monkeypatch.setattr(lm_data, "capture", capture)
    assert run_cache(tiny_model, texts, fewer, "--shard-tokens", "70", "--batch-size", "2",
                     tokens=100) == 0
    assert ShardSet(fewer).n_tokens == 100
    np.testing.assert_array_equal(ShardSet(fewer).read(0, 100),
                                  ShardSet(tmp_path / "whole").read(0, 100))


def test_rerunning_a_finished_cache_and_bad_input(tiny_model, texts, tmp_path, capsys,
                                                  n_layers, monkeypatch):
    texts = Path(shutil.copytree(texts, tmp_path / "texts"))  # (changed below)
    out = tmp_path / "acts"
    assert run_cache(tiny_model, texts, out, "--tokens", "30") == 0
    capsys.readouterr()
    assert run_cache(tiny_model, texts, out, "--tokens", "30") == 0
    said = capsys.readouterr()
    assert "already cached (30 tokens); nothing written" in said.err
    assert "wrote" not in said.out  # (fault testing: "already cached", then "wrote")
    # on a place it cannot write (a read-only file system): still already cached (a review:
    # refused once the place was checked before anything)
    import os

    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        Path(path) != tmp_path and access(path, mode, **kw)))
    assert run_cache(tiny_model, texts, out, "--tokens", "30") == 0
    assert "already cached (30 tokens)" in capsys.readouterr().err
    assert run_cache(tiny_model, texts, tmp_path / "new", "--tokens", "30") == 2
    assert f"cannot write in {tmp_path}" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", access)
    # the manifest names what it read wherever the command ran (fault testing: as given)
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["model"] == str(Path(tiny_model).absolute())
    assert all(Path(t).is_absolute() for t in source["text"])
    # a text file changed since is another cache (fault testing: "already cached", with the
    # old text's activations)
    before = (out / "manifest.json").read_text()
    with open(texts / "a.txt", "a") as f:
        f.write(" more")
    assert run_cache(tiny_model, texts, out, "--tokens", "30") == 2
    assert "cached from other contents of its text files or model" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    assert run_cache(tiny_model, texts, out, "--tokens", "30", "--context", "8") == 2
    assert "already exists" in capsys.readouterr().err
    # (fault testing: another dtype or fewer tokens were "already cached", and "wrote")
    for other in (["--tokens", "30", "--dtype", "float16"], ["--tokens", "15"]):
        assert run_cache(tiny_model, texts, out, *other) == 2
        assert "already exists" in capsys.readouterr().err

    def error(*args, **kw):
        assert run_cache(tiny_model, texts, tmp_path / "bad", *args, **kw) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert f"--layer {n_layers}: {tiny_model} has layers 0..{n_layers - 1}" in error(
        layer=n_layers)
    assert "--context must be at least 2" in error(context=1)
    # (fault testing: an islice traceback)
    for flag in ("--tokens", "--batch-size"):
        assert f"{flag} must be at most {sys.maxsize}, got {10**21}" in error(flag, str(10**21))
    assert f"--context 300: {tiny_model} takes at most 256 positions" in error(context=300)
    # (fault testing: a missing path was tried as a hub name: retries, 11 lines of noise)
    for missing in (str(tmp_path / "nope"), "./nope", "tests/nope"):
        assert main(["cache", "--model", missing, "--layer", "0", "--text", str(texts),
                     "--tokens", "5", "--out", str(tmp_path / "o")], ) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--model {missing}: no such model directory"), err
    assert main(["cache", "--model", str(tiny_model), "--layer", "0", "--text",
                 str(tmp_path / "missing.txt"), "--tokens", "5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--text" in err and "missing.txt" in err
    # (fault testing: /dev/null was "no such file or directory")
    assert main(["cache", "--model", str(tiny_model), "--layer", "0", "--text", "/dev/null",
                 "--tokens", "5", "--out", str(tmp_path / "o")]) == 2
    assert "--text /dev/null: not a regular file or directory" in capsys.readouterr().err
    # (fault testing: a file given twice, or with its directory, was cached twice, silently)
    a, docs = str(texts / "a.txt"), str(texts / "docs")
    b = str(texts / "docs" / "b.rst.txt")
    (tmp_path / "link.txt").symlink_to(a)
    for given, said in (([a, a], f"--text {a}: given twice;"),
                        ([docs, b], f"--text {b}: the same file as {b} (in --text {docs});"),
                        ([a, str(tmp_path / "link.txt")], f"the same file as {a};")):
        assert main(["cache", "--model", str(tiny_model), "--layer", "0", "--text", *given,
                     "--tokens", "5", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
    assert "--device 'foo': not a PyTorch device" in error("--device", "foo")
    assert "--device cuda:7" in error("--device", "cuda:7")
    assert "--device meta: holds no values" in error("--device", "meta")  # (was a traceback)
    # (fault testing: binary files among the text were tokenised as text, exit 0)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "shard.npy").write_bytes(b"\x93NUMPY\x01\x00" + bytes(range(256)) * 4)
    (binary / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 ".encode("latin-1") * 50)
    for name, what in (("shard.npy", "NUL bytes"), ("latin1.txt", "200 undecodable bytes")):
        assert main(["cache", "--model", str(tiny_model), "--layer", "0", "--text",
                     str(binary / name), "--tokens", "5", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"--text {binary / name}: not UTF-8 text ({what}" in err, err
    # --out over what it reads: refused, even with --overwrite, before the model loads
    shutil.copytree(texts, tmp_path / "mine")
    before = sorted(p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file())
    for out in (tmp_path / "mine", tmp_path / "mine" / "docs", tiny_model):
        assert main(["cache", "--model", str(tiny_model), "--layer", "0", "--text",
                     str(tmp_path / "mine" / "docs"), "--tokens", "5", "--out", str(out),
                     "--overwrite"]) == 2
        assert "which this command reads" in capsys.readouterr().err
    assert sorted(p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()) == before
    # (fault testing: a text file reached through a link into --out was replaced with it)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "a.txt").symlink_to(tmp_path / "mine" / "a.txt")
    assert main(["cache", "--model", str(tiny_model), "--layer", "0", "--text",
                 str(tmp_path / "linked"), "--tokens", "5", "--out", str(tmp_path / "mine"),
                 "--overwrite"]) == 2
    assert "which this command reads" in capsys.readouterr().err
    assert sorted(p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()) == before
    # (fault testing: a second cache of an --out being written loaded its model, ~35 s for
    # SmolLM2, before the staging's lock refused it)
    (tmp_path / "busy.partial").mkdir()
    with RunLock(tmp_path / "busy.partial", doing="writing busy"):
        monkeypatch.setattr(lm_data, "load_model", lambda *a, **k: pytest.fail("model loaded"))
        assert run_cache(tiny_model, texts, tmp_path / "busy") == 2
    err = capsys.readouterr().err.strip()
    assert "busy.partial: another jaxsae process is writing busy here (pid" in err, err
    assert len(err.splitlines()) == 1


def test_rerunning_a_damaged_cache_names_the_damage(tiny_model, texts, tmp_path, capsys):
    """(fault testing: a cache whose shard was deleted or truncated was "already cached;
    nothing written", exit 0)"""
    out = tmp_path / "acts"
    assert run_cache(tiny_model, texts, out, "--tokens", "30", "--shard-tokens", "16") == 0
    shard = out / "shard-00000.npy"
    whole = shard.read_bytes()
    capsys.readouterr()
    for damage in (lambda: shard.write_bytes(whole[: len(whole) // 2]), shard.unlink):
        damage()
        assert run_cache(tiny_model, texts, out, "--tokens", "30", "--shard-tokens", "16") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{out}: already cached but damaged ({shard}: " in err, err
        assert err.endswith("pass --overwrite to cache it again"), err
    assert run_cache(tiny_model, texts, out, "--tokens", "30", "--shard-tokens", "16",
                     "--overwrite") == 0
    assert shard.read_bytes() == whole


def test_text_shorter_than_a_window_is_blamed_on_text(tiny_model, tmp_path, capsys):
    """Too little text for one window: the error names --text, and no staging is left."""
    (tmp_path / "t" / "docs").mkdir(parents=True)
    (tmp_path / "t" / "a.txt").write_text("")
    (tmp_path / "t" / "docs" / "b.txt").write_text("hi")
    assert run_cache(tiny_model, tmp_path / "t", tmp_path / "acts") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --text " in err and "not one window of --context 16" \
        in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no acts, no acts.partial


def test_text_runs_out(tiny_model, texts, tmp_path, capsys, monkeypatch):
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--tokens", "100000") == 0
    n = ShardSet(tmp_path / "acts").n_tokens
    assert n == len(reference_windows(tiny_model, texts, 16)) * 15
    assert f"the text ran out after {n} tokens" in capsys.readouterr().err
    # run again: nothing to do (it said "already exists" and exited 2)
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--tokens", "100000") == 0
    assert f"already cached ({n} tokens)" in capsys.readouterr().err
    # the same files named relative to the working directory: the same cache (fault testing:
    # "already exists", the text files as given recorded in its manifest)
    monkeypatch.chdir(texts)
    assert run_cache(tiny_model, Path("."), tmp_path / "acts", "--tokens", "100000") == 0
    assert f"already cached ({n} tokens)" in capsys.readouterr().err
    # and a manifest that recorded them so (a jaxsae before 2026-12-07 evening) reads as this cache
    manifest = tmp_path / "acts" / "manifest.json"
    raw = json.loads(manifest.read_text())
    assert [f[0] for f in raw["source"]["text_ran_out"]] == [
        str(texts / "a.txt"), str(texts / "docs" / "b.rst.txt")]
    raw["source"]["text_ran_out"] = [["a.txt", 1], ["docs/b.rst.txt", 2]]
    manifest.write_text(json.dumps(raw))
    assert run_cache(tiny_model, texts, tmp_path / "acts", "--tokens", "100000") == 0
    assert f"already cached ({n} tokens)" in capsys.readouterr().err


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


# transformers' name for each matrix and norm of a Llama block -> llama.cpp's GGUF name.
GGUF_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm"}


def char_vocabulary(texts) -> list[str]:
    """A SentencePiece-style vocabulary of single characters covering the text files (so no
    merges and no unknown pieces): <unk>, <s>, </s>, then every character, a space spelt ▁."""
    chars = set((texts / "a.txt").read_text() + (texts / "docs" / "b.rst.txt").read_text())
    return ["<unk>", "<s>", "</s>", *sorted(c.replace(" ", "▁") for c in chars)]


def llama_cpp_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """A Q or K projection in llama.cpp's row order. Within each head transformers rotates row i
    with row i + head_dim/2 (the two halves), llama.cpp rotates adjacent rows 2i and 2i+1, so its
    converter interleaves the halves; transformers' GGUF loader undoes exactly this."""
    rows, *rest = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, model, tokens: list[str], qtype: str) -> dict[str, torch.Tensor]:
    """Writes a LlamaForCausalLM and a vocabulary as llama.cpp would: the hyper-parameters
    transformers turns back into a LlamaConfig, the tokenizer, and every weight under its GGUF
    name with the matrices stored as `qtype` (norms stay F32, as llama.cpp keeps them).

    Returns the model's state dict as the file holds it: each matrix through `qtype`'s
    quantisation round trip (a no-op for F32), in transformers' layout."""
    import gguf  # the extra `lm` has it; imported here so only this test needs it

    cfg = model.config
    qt = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    # Needed: without it transformers leaves Q and K in llama.cpp's row order, silently when
    # every head has its own K and V (here, with 2 for 4 heads, K and V would not even fit).
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    # tokenizer.ggml.model "llama" is SentencePiece-style: transformers builds a BPE over these
    # pieces (byte fallback, a ▁ prefix); single characters imply no merges, so the scores
    # that would rank them are all equal.
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                            gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # present, so the embeddings are not tied
    for i in range(cfg.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{name}.weight"
                  for hf, name in GGUF_BLOCK_TENSORS.items()}
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(weights) == set(names)
    stored = {}
    for hf, name in names.items():
        w = weights[hf]
        if w.ndim == 1:
            writer.add_tensor(name, w)
            stored[hf] = torch.from_numpy(w.copy())
            continue
        if name.endswith("attn_q.weight"):
            w = llama_cpp_rotary_rows(w, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = llama_cpp_rotary_rows(w, cfg.num_key_value_heads)
        data = gguf.quantize(w, qt)
        writer.add_tensor(name, data, raw_dtype=None if qt == gguf.GGMLQuantizationType.F32
                          else qt)
        # Blocks run along a row (the input features), so quantising commutes with the row
        # permutation above: the file holds the round trip of the original matrix.
        stored[hf] = torch.from_numpy(gguf.dequantize(gguf.quantize(weights[hf], qt), qt))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_a_gguf_file_caches_the_activations_of_the_model_it_holds(texts, tmp_path, qtype):
    """A real .gguf (F32, and Q4_1 as real_activations.sh's SmolLM2 file) written with
    llama.cpp's layout: transformers rebuilds config, tokenizer and weights from it (dequantising,
    un-permuting Q and K), and `jaxsae cache --model X.gguf` caches that model's activations."""
    tokens = char_vocabulary(texts)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False))
    gguf_path = tmp_path / "gguf" / f"tiny.{qtype}.gguf"
    gguf_path.parent.mkdir()
    stored = write_llama_gguf(gguf_path, model, tokens, qtype)

    lm = lm_data.load_model(str(gguf_path), layer=1, progress=False)
    assert lm.n_layers == 3
    loaded = lm.model.state_dict()
    assert loaded.keys() == stored.keys()
    for name, w in stored.items():
        torch.testing.assert_close(loaded[name], w, rtol=1e-6, atol=1e-6, msg=name)
    # The ids are the file's (the embedding rows depend on it): one per character.
    assert lm.tokenizer("The fox", add_special_tokens=False)["input_ids"] == [
        tokens.index(c) for c in "▁The▁fox"]
    assert (lm.bos_id, lm.separator_id) == (1, 2)

    out = tmp_path / "acts"
    assert run_cache(gguf_path, texts, out, "--shard-tokens", "128", tokens=200) == 0
    acts = ShardSet(out)
    assert acts.manifest.d_in == 32
    assert [s.n_tokens for s in acts.manifest.shards] == [128, 72]
    assert acts.manifest.source["model"] == str(gguf_path)
    # The expected activations: the source model, with the weights the file holds, on windows
    # cut by hand from the GGUF tokenizer's ids.
    model.load_state_dict(stored)
    model.save_pretrained(tmp_path / "source")
    windows = reference_windows(gguf_path.parent, texts, 16, gguf_file=gguf_path.name)
    hidden = reference_hidden(tmp_path / "source", windows)
    want = hidden[2][:, 1:].reshape(-1, 32)[:200]  # output of block 1
    np.testing.assert_allclose(acts.read(0, 200), want, rtol=1e-5, atol=1e-5)


def test_a_missing_gguf_file_is_an_error(tmp_path):
    with pytest.raises(lm_data.JaxsaeError, match=r"no such \.gguf file"):
        lm_data.load_model(str(tmp_path / "absent.gguf"))


def test_a_gguf_file_cut_inside_its_header_is_an_error(tmp_path):
    """(fault testing: struct.error tracebacks from the GGUF reader)"""
    cut = tmp_path / "cut.gguf"
    # magic, version 3, no tensors, one key-value pair: then the file ends
    cut.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                    + (1).to_bytes(8, "little"))
    with pytest.raises(lm_data.JaxsaeError, match=r"^--model .*cut\.gguf: cannot load it \("):
        lm_data.load_model(str(cut))


def test_a_directory_named_gguf_is_said_to_be_one(tmp_path):
    """(fault testing: it was "no such .gguf file")"""
    (tmp_path / "model.gguf").mkdir()
    with pytest.raises(lm_data.JaxsaeError, match=r"model\.gguf: a directory, not a \.gguf"):
        lm_data.load_model(str(tmp_path / "model.gguf"))


def test_mlp_in_and_mlp_out_pairs_for_transcoders(tiny_model, texts, tmp_path):
    """--hook mlp_in --target-hook mlp_out: the block's MLP input (normalised) into --out and
    its output into --out/target, from one pass, against torch hooks on the full model's MLP;
    TransformerLens's hook names in the manifests."""
    out = tmp_path / "pairs"
    assert run_cache(tiny_model, texts, out, "--hook", "mlp_in", "--target-hook", "mlp_out",
                     "--shard-tokens", "128", tokens=200) == 0
    windows = reference_windows(tiny_model, texts, 16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seen = {}
    mlp = model.model.layers[1].mlp
    handles = [mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0])),
               mlp.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))]
    with torch.inference_mode():
        model(input_ids=torch.as_tensor(windows))
    for h in handles:
        h.remove()
    for directory, key in ((out, "in"), (out / "target", "out")):
        got = ShardSet(directory).read(0, 200)
        want = seen[key][:, 1:].reshape(-1, seen[key].shape[-1]).numpy()[:200]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=key)
    hooks = [json.loads((d / "manifest.json").read_text())["source"]["hook"]
             for d in (out, out / "target")]
    assert hooks == ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    assert lm_data.parse_hook_name(hooks[0]) == (1, "mlp_in")
    assert lm_data.parse_hook_name(hooks[1]) == (1, "mlp_out")
    # rerun: already cached; the same point twice is refused
    assert run_cache(tiny_model, texts, out, "--hook", "mlp_in", "--target-hook", "mlp_out",
                     tokens=200) == 0
    assert run_cache(tiny_model, texts, tmp_path / "x", "--hook", "mlp_in", "--target-hook",
                     "mlp_in") == 2


def test_an_interrupted_pair_cache_resumes_both_to_the_same_shards(tiny_model, texts, tmp_path,
                                                                   monkeypatch):
    args = ("--hook", "mlp_in", "--target-hook", "mlp_out", "--shard-tokens", "70",
            "--batch-size", "2")
    assert run_cache(tiny_model, texts, tmp_path / "whole", *args) == 0
    calls = {"n": 0}
    capture = lm_data.capture

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 7:  # after the probe and five batches: two complete shards each
            raise KeyboardInterrupt
        return capture(*a)

    monkeypatch.setattr(lm_data, "capture", flaky)
    out = tmp_path / "resumed"
    assert run_cache(tiny_model, texts, out, *args) == 130
    assert not out.exists()
    monkeypatch.setattr(lm_data, "capture", capture)
    assert run_cache(tiny_model, texts, out, *args) == 0
    for sub in (".", "target"):
        np.testing.assert_array_equal(ShardSet(out / sub).read(0, 300),
                                      ShardSet(tmp_path / "whole" / sub).read(0, 300))
    assert not (tmp_path / "resumed.partial").exists()
