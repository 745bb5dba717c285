"""The implementations of the sparse paths' gathers, scatters and top-k (`jaxsae.kernels`:
"cpu", "xla", "pallas") against numpy, against each other through the train step, and the
Pallas kernels' lowering to Triton for CUDA (checked here, on the CPU, by jax.export).

The whole sparse forward and its gradients are checked against the dense path for every
implementation in tests/test_sae.py (test_sparse_path_equals_dense_path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import kernels, pallas_kernels
from jaxsae.build import build
from jaxsae.config import config_from_dict

IMPLS = ("cpu", "xla", "pallas")


def _inputs(seed: int, dtype=jnp.float32, n=37, k=5, m=70, d=48):
    """n is not a multiple of the Pallas blocks' 32 rows (padding is exercised); d 48 takes
    16-wide column blocks; duplicate destinations within an entry block are certain."""
    rng = np.random.default_rng(seed)
    return dict(
        coef=jnp.asarray(rng.standard_normal((n, k)), dtype),
        src=jnp.asarray(rng.standard_normal((m, d)), dtype),
        index=jnp.asarray(rng.integers(0, m, (n, k)), jnp.int32),
        g=jnp.asarray(rng.standard_normal((n, d)), dtype),
        row=jnp.asarray(rng.integers(0, n, (n, k)), jnp.int32),
    )


def _numpy_refs(a):
    coef, src, index, g, row = (np.asarray(a[k], np.float64)
                                for k in ("coef", "src", "index", "g", "row"))
    index, row = index.astype(int), row.astype(int)
    m, d = src.shape
    scatter = np.zeros((m, d))
    np.add.at(scatter, index.reshape(-1), (coef[:, :, None] * g[:, None]).reshape(-1, d))
    scatter_rows = np.zeros((m, d))
    np.add.at(scatter_rows, index.reshape(-1), (coef[:, :, None] * g[row]).reshape(-1, d))
    return {
        "gathered_sum": np.einsum("nk,nkd->nd", coef, src[index]),
        "scatter": scatter,
        "scatter with rows": scatter_rows,
        "dot_rows": np.einsum("nd,nkd->nk", g, src[index]),
        "dot_rows with rows": np.einsum("nkd,nkd->nk", g[row], src[index]),
    }


def _all_ops(impl, coef, src, index, g, row):
    m = src.shape[0]
    with kernels.using(impl):
        return {
            "gathered_sum": kernels.gathered_sum(coef, src, index),
            "scatter": kernels.scatter_rows(m, index, coef, g),
            "scatter with rows": kernels.scatter_rows(m, index, coef, g, row),
            "dot_rows": kernels.dot_rows(g, src, index),
            "dot_rows with rows": kernels.dot_rows(g, src, index, row),
        }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gathers_and_scatters_against_numpy(impl, dtype):
    """Every operation, each implementation, float32 and bfloat16 inputs (bf16 rounding of the
    inputs is in the reference too; the tolerance is bf16's for the outputs kept in bf16)."""
    a = _inputs(1, jnp.dtype(dtype))
    got = jax.jit(lambda a: _all_ops(impl, **a))(a)
    for name, want in _numpy_refs(a).items():
        assert got[name].dtype == (jnp.float32 if name.startswith("scatter") else a["coef"].dtype)
        tol = 1e-5 if dtype == "float32" or name.startswith("scatter") else 2e-2
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want, rtol=tol,
                                   atol=tol * 10, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("n, k", [(3, 2), (64, 4), (37, 5)])
def test_the_sorted_scatter_at_every_chunking(n, k):
    """The "cpu" scatter adds its entries sorted by destination, in chunks of 128: fewer
    entries than a chunk, a whole number of chunks, and a remainder; against numpy."""
    a = _inputs(4, n=n, k=k)
    want = _numpy_refs(a)
    got = jax.jit(lambda a: _all_ops("cpu", **a))(a)
    for name in ("scatter", "scatter with rows"):
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], rtol=1e-5,
                                   atol=1e-4, err_msg=name)


def test_the_sort_of_destinations_packed_or_paired():
    """Destinations and positions packed into one 32-bit key where they fit, a sort of pairs
    where they do not: the same order (by destination, then position) either way."""
    rng = np.random.default_rng(5)
    # 6 + 9 bits; 23 + 9, all 32 (destinations with the top bit set); 30 + 9 do not fit
    for n_out in (50, 2**23, 2**30):
        flat = rng.integers(0, 50, 300)
        flat[::3] = rng.integers(0, n_out, 100)
        want = np.lexsort((np.arange(300), flat))
        keys, position = jax.jit(kernels._sorted_order, static_argnums=1)(
            jnp.asarray(flat, jnp.int32), n_out)
        np.testing.assert_array_equal(np.asarray(position), want, err_msg=str(n_out))
        np.testing.assert_array_equal(np.asarray(keys), flat[want], err_msg=str(n_out))


@pytest.mark.parametrize("impl", ["cpu", "xla", "pallas"])
def test_gathers_and_scatters_under_vmap(impl):
    """A sweep vmaps the step over stacked SAEs: each operation, batched over a leading axis,
    equals the operation on each member."""
    members = [_inputs(seed) for seed in (2, 3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    got = jax.jit(jax.vmap(lambda a: _all_ops(impl, **a)))(stacked)
    for i, member in enumerate(members):
        for name, want in _numpy_refs(member).items():
            np.testing.assert_allclose(np.asarray(got[name][i]), want, rtol=1e-5, atol=1e-4,
                                       err_msg=f"{impl} {name} member {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [37, 5])
def test_encoder_matmul_and_its_gradients_against_the_plain_form(impl, dtype, rows):
    """The pre-activations (x - b_dec) @ W + b_enc (on "cpu", for batches of at least d_in
    rows: the bias as one more row of W) and the gradient of every argument, against autodiff
    of the plain expression."""
    rng = np.random.default_rng(3)
    x, b_dec, W, b_enc, g = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in
                             [(rows, 24), (24,), (24, 70), (70,), (rows, 70)])

    def plain(x, b_dec, W, b_enc):
        return jnp.sum(((x - b_dec) @ W + b_enc) * g)

    def fused(x, b_dec, W, b_enc):
        with kernels.using(impl):
            return jnp.sum(kernels.encoder_matmul(x, b_dec, W, b_enc) * g)

    with kernels.using(impl):
        got = jax.jit(kernels.encoder_matmul)(x, b_dec, W, b_enc)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
    want = np.asarray((x - b_dec).astype(jnp.float32) @ W.astype(jnp.float32)
                      + b_enc.astype(jnp.float32))
    assert got.dtype == jnp.dtype(dtype) and got.shape == (rows, 70)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, **tol)
    grads = jax.jit(jax.grad(fused, argnums=(0, 1, 2, 3)))(x, b_dec, W, b_enc)
    f32 = [a.astype(jnp.float32) for a in (x, b_dec, W, b_enc)]
    g = g.astype(jnp.float32)
    for name, a, want in zip(["x", "b_dec", "W", "b_enc"], grads,
                             jax.grad(plain, argnums=(0, 1, 2, 3))(*f32), strict=True):
        assert a.dtype == jnp.dtype(dtype), name
        # bf16: sums of ~2,600 rounded terms; compared at 2% of the gradient's largest entry.
        atol = 2e-2 * float(jnp.abs(want).max()) if dtype == "bfloat16" else tol["atol"]
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(want),
                                   rtol=tol["rtol"], atol=atol, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("k", [3, 32])
def test_top_k_indices_same_set_in_every_implementation(k):
    rng = np.random.default_rng(k)
    values = jnp.asarray(rng.standard_normal((16, 1024)), jnp.float32)
    want = np.sort(np.asarray(jax.lax.top_k(values, k)[1]), axis=1)
    for impl in IMPLS:
        def select(v, impl=impl):
            with kernels.using(impl):
                return kernels.top_k_indices(v, k)
        got = np.asarray(jax.jit(select)(values))
        np.testing.assert_array_equal(np.sort(got, axis=1), want, err_msg=impl)
        picked = np.take_along_axis(np.asarray(values), got, axis=1)
        assert (np.diff(picked, axis=1) <= 0).all(), f"{impl}: not largest first"


def test_auto_is_the_backends_choice():
    """auto: the CPU forms on the CPU, XLA's plain forms elsewhere (benchmarks/gpu_check.py
    runs this suite on a GPU); unknown names are refused."""
    auto = "cpu" if jax.default_backend() == "cpu" else "xla"
    assert kernels.implementation() == auto
    with kernels.using("pallas"):
        assert kernels.implementation() == "pallas"
        with kernels.using("auto"):
            assert kernels.implementation() == auto
        assert kernels.implementation() == "pallas"
    with pytest.raises(ValueError, match="one of"), kernels.using("triton"):
        pass


def test_pallas_refuses_rows_it_does_not_fit_and_xla_stands_in():
    """d 20 is no multiple of 16: the Pallas module refuses it, and kernels falls back to the
    plain forms (same numbers)."""
    a = _inputs(4, d=20)
    with pytest.raises(ValueError, match="divisible by 16"):
        pallas_kernels.gathered_sum(a["coef"], a["src"], a["index"])
    got = jax.jit(lambda a: _all_ops("pallas", **a))(a)
    for name, want in _numpy_refs(a).items():
        np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_kernels_lower_to_triton_for_cuda(monkeypatch, dtype):
    """What a GPU would compile: the kernels lowered through Pallas's Triton backend for CUDA
    (jax.export needs no GPU), so the device minutes are not spent on a lowering error. (The
    Triton-to-PTX compile itself happens only on a GPU.)"""
    monkeypatch.setattr(pallas_kernels, "TRITON", True)
    a = _inputs(5, jnp.dtype(dtype))  # shapes no power of two: only the blocks must be
    exported = jax.export.export(
        jax.jit(lambda a: _all_ops("pallas", **a)), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(a)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 5


def test_train_step_takes_optim_kernels(small_data, tmp_path):
    """optim.kernels reaches the traced step: three steps of a Matryoshka TopK SAE with AuxK
    (the scattered decode of the prefixes, AuxK's gathered decode, every custom VJP) log the
    same loss, AuxK term and gradient norm, and end with the same parameters, with each
    implementation."""
    results = {}
    for impl in IMPLS:
        cfg = config_from_dict({
            "data": {"path": str(small_data)}, "run_dir": str(tmp_path / impl),
            "sae": {"d_sae": 64, "activation": "topk", "k": 4},
            "loss": [{"term": "matryoshka", "prefixes": [16, 64]},
                     {"term": "auxk", "dead_tokens": 1}],
            "optim": {"batch_size": 64, "total_tokens": 64 * 20, "kernels": impl}})
        built = build(cfg, 16)
        state = built.init()
        batches = np.random.default_rng(0).standard_normal((3, 64, 16)).astype(np.float32)
        logged = []
        for batch in batches:
            state, metrics = built.step(state, jnp.asarray(batch))
            logged.append({k: float(metrics[k]) for k in ("loss", "loss.auxk", "grad_norm")})
        results[impl] = logged, jax.device_get(state.params)
    assert results["cpu"][0][-1]["loss.auxk"] > 0  # dead latents by the last step: AuxK ran
    for impl in ("xla", "pallas"):
        for step, (got, want) in enumerate(zip(results[impl][0], results["cpu"][0],
                                               strict=True)):
            for name in want:
                assert got[name] == pytest.approx(want[name], rel=1e-5), (impl, step, name)
        for name, want in results["cpu"][1].items():
            np.testing.assert_allclose(results[impl][1][name], want, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{impl} {name}")
