"""Mesh construction, and the sharded step against one device (8 forced CPU devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsae import sharding, tensorfile
from jaxsae.config import config_from_dict
from jaxsae.errors import ConfigError
from tests.conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def _cfg(**mesh):
    return config_from_dict({"data": {"path": "x"}, "sae": {"d_sae": 64},
                             "optim": {"batch_size": 64, "total_tokens": 6400, "warmup_steps": 1},
                             "mesh": mesh})


def test_mesh_sizes_and_errors():
    devices = jax.devices()[:1] * 4  # shapes only: the same device object repeated is enough
    mesh = sharding.make_mesh(_cfg(data=-1, model=2), devices)
    assert dict(mesh.shape) == {"data": 2, "model": 2}
    mesh = sharding.make_mesh(_cfg(data=1, model=-1), devices)
    assert dict(mesh.shape) == {"data": 1, "model": 4}
    with pytest.raises(ConfigError, match=r"mesh\.model"):
        sharding.make_mesh(_cfg(data=-1, model=3), devices)
    with pytest.raises(ConfigError, match="mesh"):
        sharding.make_mesh(_cfg(data=2, model=1), devices)
    with pytest.raises(ConfigError, match=r"mesh\.model"):
        config_from_dict({"data": {"path": "x"}, "sae": {"d_sae": 60}, "mesh": {"model": 8}})
    # (fault testing: with 2 processes of 2 devices, mesh.model=4 was accepted and crashed
    # with a traceback when the first batch was assembled: a model group spanning processes
    # would need each to hold every row of the batch, and each reads only its own)
    two_hosts = [types.SimpleNamespace(process_index=i // 2, id=i) for i in range(4)]
    with pytest.raises(ConfigError, match=r"mesh\.data: 1 is not a multiple of the 2 processes"):
        sharding.make_mesh(_cfg(data=1, model=4), two_hosts)


def test_param_specs_follow_the_logical_table():
    abstract = {"W_enc": jax.ShapeDtypeStruct((16, 64), "float32"),
                "W_dec": jax.ShapeDtypeStruct((64, 16), "float32"),
                "b_dec": jax.ShapeDtypeStruct((16,), "float32"),
                "other": jax.ShapeDtypeStruct((64,), "float32"),
                "scalar": jax.ShapeDtypeStruct((), "float32")}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    specs = {k: v.spec for k, v in sharding.tree_shardings(mesh, abstract, 64).items()}
    assert specs["W_enc"] == jax.sharding.PartitionSpec(None, "model")
    assert specs["W_dec"] == jax.sharding.PartitionSpec("model", None)
    assert specs["b_dec"] == jax.sharding.PartitionSpec(None)
    assert specs["other"] == jax.sharding.PartitionSpec("model")
    assert specs["scalar"] == jax.sharding.PartitionSpec()


_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxsae.config import config_from_dict
from jaxsae.build import build

def run(tree, devices, steps=10):
    built = build(config_from_dict(tree), 16, devices)
    state = built.init()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = rng.standard_normal((64, 16)).astype(np.float32)
        batch = np.maximum(batch, 0) * 2.0
        state, metrics = built.step(state, jax.device_put(batch, built.batch_sharding))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses

cases, every_mesh = json.loads(sys.argv[1]), sys.argv[2] == "every-mesh"
out = {}
for name, (sae, loss) in cases.items():
    tree = {"data": {"path": "x"}, "sae": {"d_sae": 64, **sae}, "loss": loss,
            "optim": {"lr": 1e-2, "batch_size": 64, "total_tokens": 6400, "warmup_steps": 1}}
    ref, ref_losses = run({**tree, "mesh": {"data": 1, "model": 1}}, jax.devices()[:1])
    # every case on the mixed mesh (data and model split at once); with every-mesh, the ReLU,
    # TopK and BatchTopK paths also purely data-parallel and with the whole dictionary split
    # 8 ways
    split = every_mesh and name.startswith(("relu", "topk", "batchtopk"))
    meshes = [(2, 4)] + ([(8, 1), (1, 8)] if split else [])
    for data, model in meshes:
        got, losses = run({**tree, "mesh": {"data": data, "model": model}}, jax.devices())
        diff = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
        out[f"{name} {data}x{model}"] = {
            "param_diff": diff,
            "loss_rel_diff": float(np.max(np.abs(np.array(losses) - np.array(ref_losses))
                                          / np.maximum(np.abs(ref_losses), 1.0)))}
print(json.dumps(out))
"""

CASES = {
    "relu+l1": [{"activation": "relu"}, [{"term": "mse"}, {"term": "l1", "coefficient": 0.1}]],
    "topk+auxk": [{"activation": "topk", "k": 4},
                  [{"term": "mse"}, {"term": "auxk", "dead_tokens": 64}]],
    "topk two-stage selection, tied": [{"activation": "topk", "k": 2, "tied": True},
                                       [{"term": "mse"}]],
    "topk matryoshka": [{"activation": "topk", "k": 4},
                        [{"term": "matryoshka", "prefixes": [8, 32, 64]}]],
    "batchtopk": [{"activation": "batchtopk", "k": 4}, [{"term": "mse"}]],
    "matryoshka+groups+cosine": [{"activation": "batchtopk", "k": 4}, [
        {"term": "matryoshka", "sample": {"n": 4, "resolution": 8}},
        {"term": "group_l1_l2", "group_size": 4, "coefficient": 0.1},
        {"term": "intra_group_orthogonality", "group_size": 4, "coefficient": 0.1},
        {"term": "decoder_cosine", "coefficient": 0.1}]],
    "jumprelu+l0": [{"activation": "jumprelu", "jumprelu_bandwidth": 0.1},
                    [{"term": "mse"}, {"term": "l0", "coefficient": 0.01, "bandwidth": 0.1}]],
    "gated": [{"activation": "gated"}, [{"term": "mse"}, {"term": "l1", "coefficient": 0.1},
                                        {"term": "gated_aux"}]],
    "matching_pursuit": [{"activation": "matching_pursuit", "k": 3}, [{"term": "mse"}]],
}
# The default run checks one case of each path through the sharded step (dense ReLU, the
# sparse TopK path with AuxK, BatchTopK, and every penalty at once on Matryoshka-BatchTopK) on
# the mixed 2x4 mesh, which splits the batch and the dictionary at once; the rest, and the
# ReLU and TopK paths purely data- and purely model-parallel too (~60 s more on 2 cores), are
# marked slow.
DEFAULT_CASES = ("relu+l1", "topk+auxk", "batchtopk", "matryoshka+groups+cosine")


@pytest.mark.parametrize(("names", "meshes"), [
    (DEFAULT_CASES, "mixed"),
    pytest.param(DEFAULT_CASES, "every-mesh", marks=pytest.mark.slow),
    pytest.param(tuple(n for n in CASES if n not in DEFAULT_CASES), "every-mesh",
                 marks=pytest.mark.slow)],
    ids=["default", "default-every-mesh", "rest"])
def test_sharded_steps_match_one_device(names, meshes):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8),
           "JAX_PLATFORMS": "cpu"}
    cases = {n: CASES[n] for n in names}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases), meshes], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    split = [n for n in cases if n.startswith(("relu", "topk", "batchtopk"))
             and meshes == "every-mesh"]
    assert len(results) == len(cases) + 2 * len(split)
    for case, diffs in results.items():
        assert diffs["param_diff"] < 1e-5, (case, diffs)
        assert diffs["loss_rel_diff"] < 1e-5, (case, diffs)


_AUXK_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsae import penalties, sae, sharding
from jaxsae.config import SAEConfig

D_IN, D_SAE, BATCH, DEAD_TOKENS = 16, 128, 32, 1000
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
out = {}


def dense_contractions(jaxpr):
    # products contracting over the whole dictionary (a dense decode), wherever nested
    found = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs, _), _ = eqn.params["dimension_numbers"]
            found += any(eqn.invars[0].aval.shape[d] == D_SAE for d in lhs)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "jaxpr"):
                    found += dense_contractions(getattr(sub, "jaxpr", sub))
                elif hasattr(sub, "eqns"):
                    found += dense_contractions(sub)
    return found


def member(n_dead, cfg):
    rng = np.random.default_rng(n_dead)
    params = jax.tree.map(jnp.asarray, sae.init_params(jax.random.key(n_dead), D_IN, cfg))
    tsf = np.zeros(D_SAE, np.int32)
    dead = rng.choice(D_SAE, size=n_dead, replace=False)
    tsf[dead] = DEAD_TOKENS
    b_enc = rng.normal(0, 0.5, D_SAE)
    b_enc[dead] += 1.0  # (dead latents that would fire: gradients to compare)
    params["b_enc"] = jnp.asarray(b_enc, jnp.float32)
    return params, jnp.asarray(tsf)


for activation, tied, n_dead, k_aux in json.loads(__import__("sys").argv[1]):
    # n_dead a list: a sweep of those SAEs (vmapped, as training runs one), each against
    # itself alone on one device
    cfg = SAEConfig(d_sae=D_SAE, activation=activation, k=4, tied=tied)
    members = [member(n, cfg) for n in (n_dead if isinstance(n_dead, list) else [n_dead])]
    x = jnp.asarray(np.abs(np.random.default_rng(1).standard_normal((BATCH, D_IN))),
                    jnp.float32)

    def loss(p, x, tsf, mesh, sweep_axis=None):
        o = sae.forward(p, x, cfg, train=True, tokens_since_fired=tsf, mesh=mesh,
                        sweep_axis=sweep_axis)
        return penalties.auxk(o, p, step=jnp.asarray(0), k_aux=k_aux,
                              dead_tokens=DEAD_TOKENS)[0]

    wants = [jax.jit(jax.value_and_grad(loss), static_argnums=3)(p, x, t, None)
             for p, t in members]
    want = jnp.stack([w[0] for w in wants])
    want_grads = jax.tree.map(lambda *g: jnp.stack(g), *[w[1] for w in wants])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in members])
    tsf = jnp.stack([t for _, t in members])

    def losses(p, x, tsf, mesh):
        each = jax.vmap(lambda p, t: loss(p, x, t, mesh, "sweep"), axis_name="sweep")
        return jnp.sum(each(p, tsf)), each(p, tsf)

    put = jax.device_put(params, sharding.tree_shardings(mesh, params, D_SAE, stacked=True))
    args = (put, jax.device_put(x, NamedSharding(mesh, P("data", None))),
            jax.device_put(tsf, NamedSharding(mesh, P(None, "model"))), mesh)
    # traced once: the jaxpr inspected below is the one compiled and run
    traced = jax.jit(jax.value_and_grad(losses, has_aux=True), static_argnums=3).trace(*args)
    (_, got), grads = traced.lower().compile()(*args[:3])
    out[f"{activation} tied={tied} dead={n_dead} k_aux={k_aux}"] = {
        "value": float(jnp.min(want)), "value_diff": float(jnp.max(jnp.abs(got - want))),
        "grad_diff": max(float(jnp.max(jnp.abs(grads[k] - want_grads[k]))) for k in params),
        "grad_max": max(float(jnp.max(jnp.abs(want_grads[k]))) for k in params),
        "dense_products": dense_contractions(traced.jaxpr.jaxpr)}
print(json.dumps(out))
"""


def test_auxk_on_a_split_dictionary_matches_one_device():
    """AuxK on a dictionary split over `model`: with more than 4·k_aux dead latents each
    device takes its own (the sparse split selection, the live ones masked out) and decodes
    them from its own rows; with fewer, the block of the dead latents, as on one device
    (fewer than k_aux, tied; a single one, BatchTopK). In a sweep where one SAE has more
    than 4·k_aux dead, every SAE takes the split selection, one with fewer than k_aux dead
    too (those it keeps in their place carry relu(-inf) = 0). Its value and every gradient
    equal one device's, and nothing in the step contracts over the whole dictionary (the
    dense path's decode did). (Every case runs as a sweep, a single SAE as a sweep of one,
    the branch picked at run time by the most dead latents in the sweep: the sweep's SAE with
    60 dead latents takes the split selection as it would in a sweep of one.)"""
    cases = [("topk", True, 3, 8), ("batchtopk", False, 1, None), ("topk", False, [3, 60], 8)]
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _AUXK_SCRIPT, json.dumps(cases)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for case, r in results.items():
        assert r["value"] > 0 and r["grad_max"] > 0, (case, r)
        assert r["value_diff"] <= 1e-5 * r["value"], (case, r)
        assert r["grad_diff"] <= 1e-5 * r["grad_max"], (case, r)
        assert r["dense_products"] == 0, (case, r)  # sparse: no [batch, d_sae] decode


_TIES_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxsae.activations.batchtopk import batchtopk
from jaxsae.activations.topk import topk, sparse_topk

rng = np.random.default_rng(0)
x = np.abs(rng.standard_normal((8, 16))).astype(np.float32)
params = {"W_enc": jnp.full((16, 64), 0.1, jnp.float32), "b_enc": jnp.full((64,), 0.5),
          "b_dec": jnp.zeros((16,), jnp.float32)}
tied = np.asarray(x @ np.asarray(params["W_enc"]) + 0.5)  # every latent equal in a row
partly = np.tile(np.float32([3.0]), (8, 64)); partly[:, 7] = 5.0; partly[:, 40] = 4.0
out = {}
for shape in (None, (2, 4)):
    mesh = (None if shape is None
            else Mesh(np.array(jax.devices()).reshape(shape), ("data", "model")))
    name = "one" if shape is None else f"{shape[0]}x{shape[1]}"
    dense = np.asarray(topk(jnp.asarray(tied), 4, mesh))
    live = np.asarray(topk(jnp.asarray(tied), 4, mesh, live=jnp.asarray(3)))
    part = np.asarray(topk(jnp.asarray(partly), 4, mesh))
    index, values = sparse_topk(params, jnp.asarray(x), jnp.asarray(tied), 4, mesh)
    batch = jnp.asarray(tied) if mesh is None else jax.device_put(
        tied, NamedSharding(mesh, PartitionSpec("data", "model")))
    kept = np.asarray(jax.jit(batchtopk, static_argnums=1)(batch, 4)[0]).ravel() != 0
    first = np.zeros(kept.shape, bool)
    first[np.argsort(-tied.ravel(), kind="stable")[:32]] = True
    out[name] = {"dense": np.count_nonzero(dense, 1).tolist(),
                 "live": np.count_nonzero(live, 1).tolist(),
                 "part_sum": part.sum(1).tolist(), "part_n": np.count_nonzero(part, 1).tolist(),
                 "sparse": np.count_nonzero(np.asarray(values), 1).tolist(),
                 "batch": int(kept.sum()), "batch_first": bool((kept == first).all())}
print(json.dumps(out))
"""


def test_topk_keeps_exactly_k_when_values_tie():
    """(fault testing: an SAE whose pre-activations tie at the k-th value, e.g. equal encoder
    columns, was evaluated with every tied latent kept: L0 29.9 for k 4.) Exactly k (or the
    swept k) a row, dense and sparse, on one device and with the dictionary split 4 ways
    (the ties a row still needs shared out over the devices); the values kept are the k
    largest (5 + 4 + 3 + 3). BatchTopK's selection on the sharded array (as a dictionary
    split over `model` runs it) keeps exactly batch·k, the first ties in row-major order."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _TIES_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"one", "2x4"}
    for got in results.values():
        assert got == {"dense": [4] * 8, "live": [3] * 8, "part_sum": [15.0] * 8,
                       "part_n": [4] * 8, "sparse": [4] * 8, "batch": 32,
                       "batch_first": True}, got


_BATCHTOPK_SPLIT_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxsae import sae
from jaxsae.config import config_from_dict

cfg = config_from_dict({"data": {"path": "x"}, "sae": {"d_sae": 64, "activation": "batchtopk",
                                                       "k": 4}, "optim": {"batch_size": 64}})
params = sae.init_params(jax.random.key(0), 16, cfg.sae)
rng = np.random.default_rng(0)
x = (np.maximum(rng.standard_normal((64, 16)), 0) * 2).astype(np.float32)
x[5] = x[4]  # (a copy of a token: its values tie)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
specs = {"W_enc": P(None, "model"), "W_dec": P("model", None), "b_enc": P("model"),
         "b_dec": P(), "threshold": P("model")}
out = {}
for live in (None, 3):
    def loss(params, x, mesh, sparse):
        k = None if live is None else jnp.asarray(live)
        o = sae.forward(params, x, cfg.sae, train=True, mesh=mesh, prefix_ends=(8, 32), k=k,
                        sparse=sparse)
        # every block's reconstruction in the loss (as Matryoshka's prefixes take them)
        return jnp.sum((o.x_hat - x) ** 2) + jnp.sum(o.block_recons[:2] ** 2), o
    (ref, ref_out), ref_g = jax.value_and_grad(loss, has_aux=True)(params, x, None, False)
    split = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    (got, got_out), got_g = jax.jit(lambda p, x: jax.value_and_grad(loss, has_aux=True)(
        p, x, mesh, True))(split, xs)
    out[str(live)] = {
        "lists": list(got_out.top_rows.shape),
        "acts": float(jnp.max(jnp.abs(got_out.acts - ref_out.acts))),
        "kept": int(jnp.sum(got_out.top_values > 0)),
        "threshold": [float(ref_out.batch_threshold), float(got_out.batch_threshold)],
        "loss": abs(float(got) - float(ref)) / abs(float(ref)),
        "grads": max(float(jnp.max(jnp.abs(got_g[k] - ref_g[k])) / jnp.max(jnp.abs(ref_g[k])))
                     for k in ("W_enc", "W_dec", "b_enc", "b_dec"))}
print(json.dumps(out))
"""


def test_batchtopk_stays_sparse_on_a_split_dictionary():
    """BatchTopK on a dictionary split over `model` (issue 20, item 5): each device lists its
    own kept entries ([data, model, slots]) and decodes them from its own rows; the codes,
    the batch threshold, the loss over Matryoshka-style blocks and every gradient equal the
    dense path's on one device, with k traced (a sweep over k) and tied values (a copied
    token). (Until 2026-12-07 it kept the dense path there.)"""
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _BATCHTOPK_SPLIT_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for live, got in results.items():
        assert got["lists"] == [2, 4, 256], (live, got)  # min(batch·k, 32 rows x 16 latents)
        assert got["acts"] == 0.0 and got["kept"] == 64 * (4 if live == "None" else 3), got
        assert got["threshold"][0] == got["threshold"][1], got
        assert got["loss"] < 1e-6 and got["grads"] < 1e-5, (live, got)


_RESUME_SCRIPT = r"""
import sys
from jaxsae import train as train_mod
from jaxsae.config import config_from_dict
from tests.conftest import small_config_dict
data, run_dir, crash_at, axis = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tree = small_config_dict(data, run_dir, mesh={"data": 1, "model": 1, axis: -1})
if crash_at:
    real = train_mod.Loader.batches
    def dying(self):
        for i, item in enumerate(real(self)):
            if i == crash_at:
                raise SystemExit(3)
            yield item
    train_mod.Loader.batches = dying
train_mod.train(config_from_dict(tree), progress=False)
"""


@pytest.mark.parametrize("axis", ["model", pytest.param("data", marks=pytest.mark.slow)])
def test_restore_onto_another_device_count(small_data, tmp_path, axis):
    """Checkpoints of a run whose mesh axis is -1 (every device) restore onto a different
    number of devices: the batch, or the dictionary, split otherwise; the run says that it
    then agrees with an uninterrupted one to float rounding, not bit for bit (fault testing:
    mesh.model -1 resumed without a word)."""

    def run(devices: int, run_dir, crash_at: int = 0) -> tuple[int, str]:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
               "XLA_FLAGS": xla_flags(devices)}
        proc = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, str(small_data),
                               str(run_dir), str(crash_at), axis], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode in (0, 3), proc.stderr
        return proc.returncode, proc.stdout

    run(4, tmp_path / "straight")
    assert run(4, tmp_path / "moved", crash_at=13)[0] == 3  # died after the step-8 checkpoint
    code, out = run(2, tmp_path / "moved")  # resumed on 2 devices
    was, now = ("4x1", "2x1") if axis == "data" else ("1x4", "1x2")
    assert code == 0 and f"trained on a {was} mesh (data x model) and resumes on {now}" in out
    a = tensorfile.read(tmp_path / "straight" / "sae" / "sae_weights.safetensors")
    b = tensorfile.read(tmp_path / "moved" / "sae" / "sae_weights.safetensors")
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
