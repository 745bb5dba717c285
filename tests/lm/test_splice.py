"""CE loss recovered (`jaxsae eval --model`) against SAEs whose answer is known and a plain
PyTorch reference of each loss."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
import yaml

from jaxsae.cli import main
from jaxsae.config import SAEConfig
from jaxsae.export import export_sae

D = 32
CONTEXT = 16


def write_sae(path, W_enc, W_dec, *, hook_name="blocks.1.hook_resid_post", training=None):
    d_sae = W_dec.shape[0]
    params = {"W_enc": W_enc.astype(np.float32), "W_dec": W_dec.astype(np.float32),
              "b_enc": np.zeros(d_sae, np.float32), "b_dec": np.zeros(W_dec.shape[1], np.float32)}
    meta = {"hook_name": hook_name, "context_size": CONTEXT} if hook_name else {}
    return export_sae(params, SAEConfig(d_sae=d_sae, decoder_norm="free"), path, metadata=meta,
                      training=training)


def identity_sae(path, **kw):
    """relu(x) - relu(-x) = x: a perfect reconstruction with 2·D latents."""
    eye = np.eye(D)
    return write_sae(path, np.concatenate([eye, -eye], 1), np.concatenate([eye, -eye], 0), **kw)


def zero_sae(path, **kw):
    return write_sae(path, np.zeros((D, 8)), np.zeros((8, D)), **kw)


def run_eval(sae_dir, model, texts, *extra, capsys):
    code = main(["eval", str(sae_dir), "--model", str(model), "--text", str(texts / "a.txt"),
                 "--tokens", "150", "--windows-per-batch", "4", "--no-progress", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def reference_batch(model_dir, texts):
    """The model, the 10 windows `eval --tokens 150` evaluates, and labels for the predictions
    made from positions 1..T-2."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stream = tok((texts / "a.txt").read_text(), add_special_tokens=False)["input_ids"]
    stream.append(tok.eos_token_id)
    ids = torch.tensor([[tok.bos_token_id, *stream[i : i + CONTEXT - 1]]
                        for i in range(0, 10 * (CONTEXT - 1), CONTEXT - 1)])
    labels = ids.clone()
    labels[:, :2] = -100
    return model, ids, labels


def reference_losses(model_dir, texts, layer=1, clean_above=None):
    """Clean, zero-ablated and mean-ablated CE (nats per token predicted from positions >= 1),
    computed with the model's own `labels` loss and a hand-written hook."""
    model, ids, labels = reference_batch(model_dir, texts)

    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    norms = hidden[:, 1:].norm(dim=-1)
    limit = None if clean_above is None else clean_above * norms.median()

    def loss(replace=None):
        handle = None
        if replace is not None:
            def hook(module, args, output):
                out = output.clone()
                new = replace(output[:, 1:])
                if limit is not None:
                    sink = output[:, 1:].norm(dim=-1, keepdim=True) > limit
                    new = torch.where(sink, output[:, 1:], new)
                out[:, 1:] = new
                return out
            handle = model.model.layers[layer].register_forward_hook(hook)
        with torch.inference_mode():
            value = float(model(input_ids=ids, labels=labels).loss)
        if handle:
            handle.remove()
        return value

    spliced = hidden[:, 1:].reshape(-1, D)
    if limit is not None:
        spliced = spliced[norms.reshape(-1) <= limit]
    mean = spliced.mean(0)
    return {"ce_clean": loss(), "ce_zero_ablation": loss(torch.zeros_like),
            "ce_mean_ablation": loss(lambda x: mean.expand_as(x)),
            "clean_positions": 0 if limit is None else int((norms > limit).sum())}


def test_a_perfect_sae_recovers_everything(tiny_model, texts, tmp_path, capsys):
    m = run_eval(identity_sae(tmp_path / "sae"), tiny_model, texts, capsys=capsys)
    ref = reference_losses(tiny_model, texts)
    assert m["hook"] == "blocks.1.hook_resid_post"  # from the SAE's hook_name
    assert m["sequences"] == 10 and m["predicted_tokens"] == 10 * (CONTEXT - 2)
    for key, want in ref.items():
        assert m[key] == pytest.approx(want, rel=1e-5), key
    assert m["clean_positions"] == 0
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], rel=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_zero_ablation"] > 0.01 and m["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert m["tokens"] == 10 * (CONTEXT - 1)  # activations seen by the SAE
    assert m["l0"] == pytest.approx(D, abs=0.1)


def test_a_zero_sae_is_zero_ablation(tiny_model, texts, tmp_path, capsys):
    m = run_eval(zero_sae(tmp_path / "sae"), tiny_model, texts, "--layer", "1", capsys=capsys)
    assert m["ce_sae"] == pytest.approx(m["ce_zero_ablation"], rel=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_sae"] == pytest.approx(m["kl_zero_ablation"], rel=1e-6)
    assert m["l0"] == 0


def test_several_saes_share_the_clean_and_ablated_passes(tiny_model, texts, tmp_path, capsys):
    a, b = identity_sae(tmp_path / "a"), zero_sae(tmp_path / "b")
    both = run_eval_many([a, b], tiny_model, texts, capsys)
    assert [m["sae"] for m in both] == [str(a), str(b)]
    for m, sae in zip(both, (a, b), strict=True):
        alone = run_eval(sae, tiny_model, texts, capsys=capsys)
        assert m.keys() == alone.keys()
        for k, v in alone.items():
            assert m[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k
    assert both[0]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert both[1]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    other = identity_sae(tmp_path / "c", hook_name="blocks.2.hook_resid_post")
    assert main(["eval", str(a), str(other), "--model", str(tiny_model), "--text",
                 str(texts), "--no-progress"]) == 2
    err = capsys.readouterr().err  # names what differs, in words
    assert "spliced differently" in err and "evaluate them separately" in err
    assert re.search(r"layer 2 against 1\b", err) and "context" not in err, err
    assert main(["eval", str(a), str(b), "--data", str(tmp_path)]) == 2
    assert "--data evaluates one SAE" in capsys.readouterr().err


def run_eval_many(saes, model, texts, capsys):
    code = main(["eval", *map(str, saes), "--model", str(model), "--text",
                 str(texts / "a.txt"), "--tokens", "150", "--windows-per-batch", "4",
                 "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_sinks_above_a_norm_stay_clean(tiny_model, texts, tmp_path, capsys):
    """Positions whose norm is above R x the median are left clean in every variant (R from
    --clean-norm-above, else the SAE's training data.drop_norm_above)."""
    ref = reference_losses(tiny_model, texts, clean_above=1.1)
    assert 0 < ref["clean_positions"] < 10 * (CONTEXT - 1) // 2
    by_flag = run_eval(zero_sae(tmp_path / "a"), tiny_model, texts, "--clean-norm-above", "1.1",
                       capsys=capsys)
    by_cfg = run_eval(zero_sae(tmp_path / "b", training={"drop_norm_above": 1.1}), tiny_model,
                      texts, capsys=capsys)
    for m in (by_flag, by_cfg):
        for key, want in ref.items():
            assert m[key] == pytest.approx(want, rel=1e-5), key
        assert m["ce_sae"] == pytest.approx(m["ce_zero_ablation"], rel=1e-6)
        assert m["tokens"] == 10 * (CONTEXT - 1) - ref["clean_positions"]


def test_resid_pre_and_the_first_position(tiny_model, texts, tmp_path, capsys):
    sae = identity_sae(tmp_path / "sae", hook_name="blocks.2.hook_resid_pre")
    m = run_eval(sae, tiny_model, texts, "--no-drop-first-position", capsys=capsys)
    assert m["hook"] == "blocks.2.hook_resid_pre"
    assert m["predicted_tokens"] == 10 * (CONTEXT - 1) and m["ce_loss_recovered"] == \
        pytest.approx(1.0, abs=1e-4)
    # blocks.2.hook_resid_pre is blocks.1.hook_resid_post: the same ablations.
    post = run_eval(sae, tiny_model, texts, "--no-drop-first-position", "--layer", "1",
                    "--hook", "resid_post", capsys=capsys)
    assert m["ce_zero_ablation"] == pytest.approx(post["ce_zero_ablation"], rel=1e-5)


@pytest.mark.parametrize(("layer", "point"), [(1, "resid_post"), (2, "resid_pre"),
                                           (0, "resid_pre")])
def test_spliced_passes_reuse_the_blocks_before_the_hook(tiny_model, texts, tmp_path, layer,
                                                        point, monkeypatch):
    """The blocks before the hook run once per batch (clean pass), not once per variant; the
    figures are those of running the whole model for every variant."""
    from jaxsae import export, splice
    from jaxsae.data import lm as lm_data

    rng = np.random.default_rng(0)
    sae = export.load_sae(write_sae(tmp_path / "sae", rng.normal(size=(D, 48)),
                                    rng.normal(size=(48, D)) / 8, hook_name=None))
    lm = lm_data.load_model(str(tiny_model), layer=layer, context=CONTEXT)
    windows = splice.eval_windows(lm, lm_data.text_files([str(texts / "a.txt")]), CONTEXT,
                                  150, 1)
    runs = []
    block_class = type(lm.blocks[0])
    forward = block_class.forward
    monkeypatch.setattr(block_class, "forward", lambda self, *a, **kw: (
        runs.append(1), forward(self, *a, **kw))[1])
    results = {}
    for reuse in (True, False):
        runs.clear()
        results[reuse] = splice.ce_loss_recovered([sae, sae], lm, layer, point, windows,
                                                  batch_size=4, progress=False,
                                                  reuse_prefix=reuse)
        results[reuse, "runs"] = len(runs)
    batches = -(-len(windows) // 4)
    n = lm.n_layers
    variants = 4  # zero, mean, two SAEs
    capture = batches * (layer + (point == "resid_post"))  # the first pass stops at the hook
    assert results[False, "runs"] == capture + batches * n * (1 + variants)
    assert results[True, "runs"] == capture + batches * (n + variants * (n - layer))
    for got, want in zip(results[True], results[False], strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                                else value), key
    assert results[True][0]["kl_sae"] > 0  # a real splice, not a no-op


def test_cache_train_and_evaluate_end_to_end(tiny_model, texts, tmp_path, capsys):
    acts = tmp_path / "acts"
    assert main(["cache", "--model", str(tiny_model), "--layer", "1", "--text", str(texts),
                 "--tokens", "400", "--context", str(CONTEXT), "--out", str(acts),
                 "--no-progress"]) == 0
    config = {"name": "lm", "run_dir": str(tmp_path / "run"),
              "data": {"path": str(acts), "eval_tokens": 0},
              "sae": {"d_sae": 64, "activation": "topk", "k": 8},
              "loss": [{"term": "mse"}],
              "optim": {"lr": 3e-3, "batch_size": 64, "total_tokens": 6400, "warmup_steps": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    sae = tmp_path / "run" / "sae"
    meta = json.loads((sae / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == str(tiny_model)
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["context_size"] == CONTEXT and meta["drop_first_position"] is True
    capsys.readouterr()
    m = run_eval(sae, tiny_model, texts, capsys=capsys)
    assert m["hook"] == "blocks.1.hook_resid_post"
    assert m["l0"] == pytest.approx(8.0)
    # A random model's losses sit near log(vocab), so only the KL ordering is certain.
    assert m["explained_variance"] > 0.5
    assert 0 < m["kl_sae"] < m["kl_zero_ablation"] and np.isfinite(m["ce_loss_recovered"])
    # (fault testing: a text that ran out before --tokens was evaluated without a word)
    assert main(["eval", str(sae), "--model", str(tiny_model), "--text", str(texts / "a.txt"),
                 "--tokens", "1000000", "--no-progress"]) == 0
    out = capsys.readouterr()
    evaluated = json.loads(out.out)["tokens"]
    assert f"warning: the text ran out after {evaluated} evaluated positions (--tokens " \
           "1000000)" in out.err


def test_bad_input(tiny_model, texts, tmp_path, capsys):
    def error(sae, *args):
        assert main(["eval", str(sae), "--model", str(tiny_model), "--no-progress",
                     *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    sae = identity_sae(tmp_path / "sae")
    assert "--text: required" in error(sae)
    bare = write_sae(tmp_path / "bare", np.eye(D), np.eye(D), hook_name=None)
    assert "--layer: required" in error(bare, "--text", str(texts))
    wide = write_sae(tmp_path / "wide", np.zeros((D + 1, 4)), np.zeros((4, D + 1)))
    # (fault testing: found only once the model's weights had loaded; now from its config)
    assert f"{wide}: the SAE has d_in 33, but {tiny_model}'s hook points are {D} wide" in error(
        wide, "--text", str(texts))
    assert "--layer 7" in error(sae, "--text", str(texts), "--layer", "7")
    assert "--truth goes with --data" in error(sae, "--text", str(texts), "--truth", "x")
    for bad in ("0", "nan"):  # (fault testing: nan passed, then the mean of nothing)
        assert "--clean-norm-above must be a finite number > 0" in error(
            sae, "--text", str(texts), "--clean-norm-above", bad)
    # (0 was replaced by the SAE's context_size)
    assert "--context must be at least 3" in error(sae, "--text", str(texts), "--context", "0")
    assert "--device 'foo'" in error(sae, "--text", str(texts), "--device", "foo")
    # fault testing: position 0 left out, a window of 2 predicted nothing (ZeroDivisionError);
    # a limit leaving every position clean reported nothing spliced as measured (a traceback)
    assert ("--context must be at least 3, got 2 (position 0 is left out, and a spliced "
            "position must predict the next token)") in error(sae, "--text", str(texts),
                                                              "--context", "2")
    assert "nothing would be spliced" in error(sae, "--text", str(texts),
                                               "--clean-norm-above", "0.001")
    assert '"predicted_tokens": ' in (main(["eval", str(sae), "--model", str(tiny_model),
                                             "--text", str(texts / "a.txt"), "--tokens",
                                             str(10**21), "--no-progress"]) == 0
                                       and capsys.readouterr().out)  # (islice's traceback)
    # what cfg.json gives is checked, and named (fault testing: tracebacks, or a flag blamed)
    for key, value, says in (
            ("context_size", "32", "metadata.context_size must be a positive integer"),
            ("context_size", 1, "metadata.context_size gives --context must be at least 3"),
            ("hook_name", "blocks.7.hook_resid_post", "metadata.hook_name gives --layer 7"),
            ("drop_first_position", "no", "metadata.drop_first_position must be true or "
                                          "false")):
        odd = identity_sae(tmp_path / f"odd-{key}-{value}")
        cfg = json.loads((odd / "cfg.json").read_text())
        cfg["metadata"][key] = value
        (odd / "cfg.json").write_text(json.dumps(cfg))
        assert f"{odd}/cfg.json: {says}" in error(odd, "--text", str(texts))


def test_a_transcoder_replaces_the_mlp_output_with_its_own(tiny_model, texts, tmp_path, capsys):
    """A skip transcoder reads block 1's MLP input and its output replaces the MLP's output
    (the points its cfg.json names): CE against a plain PyTorch hook on the MLP computing
    relu(x·W_enc + b_enc)·W_dec + b_dec + x·W_skipᵀ; zero ablation zeroes the MLP output."""
    rng = np.random.default_rng(0)
    d_sae = 16
    params = {"W_enc": rng.normal(0, 0.3, (D, d_sae)), "b_enc": rng.normal(0, 0.1, d_sae),
              "W_dec": rng.normal(0, 0.1, (d_sae, D)), "b_dec": rng.normal(0, 0.01, D),
              "W_skip": rng.normal(0, 0.1, (D, D))}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    meta = {"hook_name": "blocks.1.ln2.hook_normalized",
            "hook_name_out": "blocks.1.hook_mlp_out", "context_size": CONTEXT}
    cfg = SAEConfig(d_sae=d_sae, decoder_norm="free", transcoder=True, skip=True)
    m = run_eval(export_sae(params, cfg, tmp_path / "tc", metadata=meta), tiny_model, texts,
                 capsys=capsys)
    assert (m["hook_in"], m["hook"]) == ("blocks.1.ln2.hook_normalized",
                                         "blocks.1.hook_mlp_out")

    model, ids, labels = reference_batch(tiny_model, texts)
    t = {k: torch.from_numpy(v) for k, v in params.items()}

    def loss(replace):
        def hook(module, args, output):
            out = output.clone()
            out[:, 1:] = replace(args[0][:, 1:], output[:, 1:])
            return out
        handle = model.model.layers[1].mlp.register_forward_hook(hook)
        with torch.inference_mode():
            value = float(model(input_ids=ids, labels=labels).loss)
        handle.remove()
        return value

    transcoded = loss(lambda x, y: torch.relu(x @ t["W_enc"] + t["b_enc"]) @ t["W_dec"]
                      + t["b_dec"] + x @ t["W_skip"].T)
    assert m["ce_sae"] == pytest.approx(transcoded, rel=1e-5)
    assert m["ce_zero_ablation"] == pytest.approx(loss(lambda x, y: torch.zeros_like(y)),
                                                  rel=1e-5)
    assert m["kl_sae"] > 1e-6  # it did replace something
    assert 0 < m["l0"] <= d_sae and m["tokens"] == 10 * (CONTEXT - 1)
    # one that reads a point the model computes after the one it replaces (fault testing: a
    # KeyError traceback once the model had run)
    backwards = export_sae(params, cfg, tmp_path / "backwards", metadata={
        **meta, "hook_name": "blocks.1.hook_resid_post", "hook_name_out": "blocks.1.hook_mlp_out"})
    assert main(["eval", str(backwards), "--model", str(tiny_model), "--text",
                 str(texts / "a.txt"), "--no-progress"]) == 2
    assert (f"{backwards}: a transcoder that reads blocks.1.hook_resid_post and replaces "
            "blocks.1.hook_mlp_out, which the model computes first, cannot be spliced"
            ) in capsys.readouterr().err


def test_transcoder_from_cached_pairs_to_ce_loss_recovered(tiny_model, texts, tmp_path,
                                                           capsys):
    """cache --hook mlp_in --target-hook mlp_out -> train a transcoder on the pairs -> its
    cfg.json names both points -> eval --model splices it there with no flags."""
    acts = tmp_path / "pairs"
    assert main(["cache", "--model", str(tiny_model), "--layer", "1", "--text", str(texts),
                 "--tokens", "400", "--context", str(CONTEXT), "--out", str(acts),
                 "--hook", "mlp_in", "--target-hook", "mlp_out", "--no-progress"]) == 0
    config = {"name": "tc", "run_dir": str(tmp_path / "run"),
              "data": {"path": str(acts), "target": str(acts / "target"), "eval_tokens": 0},
              "sae": {"d_sae": 64, "activation": "relu", "skip": True, "decoder_norm": "free"},
              "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 0.001}],
              "optim": {"lr": 3e-3, "batch_size": 64, "total_tokens": 6400, "warmup_steps": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    sae = tmp_path / "run" / "sae"
    written = json.loads((sae / "cfg.json").read_text())
    assert written["architecture"] == "skip_transcoder"
    assert written["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert written["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    capsys.readouterr()
    m = run_eval(sae, tiny_model, texts, capsys=capsys)
    assert (m["hook_in"], m["hook"]) == ("blocks.1.ln2.hook_normalized",
                                         "blocks.1.hook_mlp_out")
    assert m["explained_variance"] > 0.2  # of the MLP output, from its input (100 steps)
    assert 0 < m["kl_sae"] < m["kl_zero_ablation"] and np.isfinite(m["ce_loss_recovered"])
