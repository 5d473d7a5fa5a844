"""GPT-2 model: causality, KV cache, padding invariance, naming, init, precision paths."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from minichat.config import ModelConfig
from minichat.model import (
    GPT,
    ScalarGPT,
    count_params,
    flops_per_token,
    gpt2_state_dict,
    init_cache,
    logprobs_from_logits,
    num_params_formula,
)

CFG = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
B, T = 3, 12


@pytest.fixture(scope="module")
def gpt():
    return GPT.init(CFG, 0)


@pytest.fixture(scope="module")
def split(gpt):
    return nnx.split(gpt)


@pytest.fixture(scope="module")
def forward(split):
    """Jitted full forward over (state, tokens, mask) -> logits, shared by examples."""
    graphdef, _ = split

    @jax.jit
    def f(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, mask)[0]

    return f


def _tokens(seed, shape=(B, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


# ------------------------------------------------------------------- structure and init

def _expected_paths(n_layer):
    paths = {"wte.embedding", "wpe.embedding", "ln_f.scale", "ln_f.bias"}
    for i in range(n_layer):
        for name in ("ln_1.scale", "ln_1.bias", "ln_2.scale", "ln_2.bias",
                     "attn.c_attn.kernel", "attn.c_attn.bias",
                     "attn.c_proj.kernel", "attn.c_proj.bias",
                     "mlp.c_fc.kernel", "mlp.c_fc.bias", "mlp.c_proj.kernel", "mlp.c_proj.bias"):
            paths.add(f"h.{i}.{name}")
    return paths


def test_parameter_names_follow_gpt2(gpt):
    flat = nnx.to_flat_state(nnx.state(gpt, nnx.Param))
    paths = {".".join(str(p) for p in path) for path, _ in flat}
    assert paths == _expected_paths(CFG.n_layer)
    # and the Hugging Face export names
    hf = set(gpt2_state_dict(gpt))
    expected = {"transformer.wte.weight", "transformer.wpe.weight",
                "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(CFG.n_layer):
        for name in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            expected |= {f"transformer.h.{i}.{name}.weight", f"transformer.h.{i}.{name}.bias"}
    assert hf == expected
    shapes = {k: v.shape for k, v in gpt2_state_dict(gpt).items()}
    C = CFG.n_embd
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (C, 3 * C)  # HF Conv1D: (in, out)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (4 * C, C)


@pytest.mark.parametrize("cfg", [
    CFG,
    ModelConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128),
    ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
])
def test_count_params_closed_form(cfg):
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    V, Tm, L, C = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    per_block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    expected = V * C + Tm * C + L * per_block + 2 * C
    assert count_params(abstract) == expected == num_params_formula(cfg)
    if cfg.n_layer == 12:
        assert expected == 124_439_808  # GPT-2 small, tied embeddings


def test_flops_per_token():
    n = num_params_formula(CFG) - CFG.block_size * CFG.n_embd
    assert flops_per_token(CFG, 16) == 6 * n + 12 * CFG.n_layer * 16 * CFG.n_embd


def test_gpt2_init_statistics():
    cfg = ModelConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = GPT.init(cfg, 3)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in model.h:
        assert np.std(block.attn.c_attn.kernel[...]) == pytest.approx(0.02, rel=0.05)
        assert np.std(block.mlp.c_fc.kernel[...]) == pytest.approx(0.02, rel=0.05)
        assert np.std(block.attn.c_proj.kernel[...]) == pytest.approx(resid, rel=0.05)
        assert np.std(block.mlp.c_proj.kernel[...]) == pytest.approx(resid, rel=0.05)
        assert np.all(block.attn.c_attn.bias[...] == 0) and np.all(block.ln_1.scale[...] == 1)
    assert np.std(model.wte.embedding[...]) == pytest.approx(0.02, rel=0.05)
    assert np.std(model.wpe.embedding[...]) == pytest.approx(0.02, rel=0.05)


# ------------------------------------------------------------------- forward semantics

def test_output_shapes_and_dtypes(gpt):
    logits, hidden = gpt(_tokens(0))
    assert logits.shape == (B, T, CFG.vocab_size) and logits.dtype == jnp.float32
    assert hidden.shape == (B, T, CFG.n_embd) and hidden.dtype == jnp.float32
    np.testing.assert_allclose(gpt.hidden_states(_tokens(0)), hidden, atol=1e-6)
    # tied embedding: logits = hidden . wte^T
    np.testing.assert_allclose(logits, hidden @ gpt.wte.embedding[...].T, atol=1e-4)


@settings(max_examples=15)
@given(t=st.integers(0, T - 2), seed=st.integers(0, 2**16))
def test_causality(split, forward, t, seed):
    """Changing tokens after position t never changes the logits at positions <= t."""
    _, state = split
    tokens = _tokens(seed)
    changed = tokens.at[:, t + 1:].set(_tokens(seed + 1)[:, t + 1:])
    a = forward(state, tokens, jnp.ones((B, T), jnp.int32))
    b = forward(state, changed, jnp.ones((B, T), jnp.int32))
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-5)  # and the test can see


@settings(max_examples=15)
@given(pads=st.lists(st.integers(0, T - 1), min_size=B, max_size=B), seed=st.integers(0, 2**16))
def test_left_padding_invariance(split, forward, pads, seed):
    """A row left-padded by p tokens gives, at its real tokens, the unpadded row's logits."""
    _, state = split
    tokens = _tokens(seed)
    pads = np.array(pads)
    mask = (np.arange(T)[None, :] >= pads[:, None]).astype(np.int32)
    garbage = _tokens(seed + 7)
    padded = jnp.where(mask > 0, tokens, garbage)  # what sits in the pad slots must not matter
    logits = np.asarray(forward(state, padded, jnp.asarray(mask)))
    assert np.all(np.isfinite(logits))
    for b in range(B):
        n = T - pads[b]
        ref = forward(state, _pad_right(tokens[b, pads[b]:]), jnp.asarray(_right_mask(n)))
        np.testing.assert_allclose(logits[b, pads[b]:], np.asarray(ref)[0, :n], atol=1e-4)


def _pad_right(row):
    """(n,) -> (B, T) with the row first (right-padded with zeros), same compiled shape."""
    out = np.zeros((B, T), np.int32)
    out[0, : len(row)] = np.asarray(row)
    return jnp.asarray(out)


def _right_mask(n):
    m = np.zeros((B, T), np.int32)
    m[0, :n] = 1
    return m


@settings(max_examples=10)
@given(n=st.integers(1, T), seed=st.integers(0, 2**16))
def test_right_padding_invariance(split, forward, n, seed):
    """Right padding (training batches) leaves the real positions' logits unchanged."""
    _, state = split
    tokens = _tokens(seed)
    mask = np.zeros((B, T), np.int32)
    mask[:, :n] = 1
    padded = jnp.where(mask > 0, tokens, _tokens(seed + 3))
    a = forward(state, padded, jnp.asarray(mask))
    b = forward(state, tokens, jnp.ones((B, T), jnp.int32))
    np.testing.assert_allclose(a[:, :n], b[:, :n], atol=1e-5)
    assert np.all(np.isfinite(np.asarray(a)))


@settings(max_examples=10)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_packed_segments_equal_separate_rows(split, lengths, pad, seed):
    """Sequences packed into one row with segment ids (SFT packing) get exactly the logits
    each gets alone: attention is block-diagonal and positions restart per segment."""
    graphdef, state = split
    model = nnx.merge(graphdef, state)
    seqs = [np.asarray(_tokens(seed + i, (1, n)))[0] for i, n in enumerate(lengths)]
    width = sum(lengths) + pad
    row = np.zeros(width, np.int32)
    row[:sum(lengths)] = np.concatenate(seqs)
    segments = np.zeros(width, np.int32)
    segments[:sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    valid = (segments > 0).astype(np.int32)
    packed, _ = model(jnp.asarray(row[None]), jnp.asarray(valid[None]), segments=jnp.asarray(segments[None]))
    start = 0
    for seq in seqs:
        alone, _ = model(jnp.asarray(seq[None]))
        np.testing.assert_allclose(packed[0, start:start + len(seq)], alone[0], atol=1e-5)
        start += len(seq)


@settings(max_examples=10)
@given(prefixes=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       tails=st.lists(st.integers(1, 3), min_size=1, max_size=3), pad=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_shared_prefix_branches_equal_separate_rows(split, prefixes, tails, pad, seed):
    """Segments laid out as trees (a prefix once, then several continuations with branch
    ids 1, 2, ...) give every continuation the logits of prefix + continuation alone, and
    the prefix its own logits: a continuation sees the prefix and itself, never a sibling,
    and its positions go on from the prefix's."""
    graphdef, state = split
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(0, CFG.vocab_size, n).astype(np.int32)
    row, segments, branches, expected = [], [], [], []
    for s, L in enumerate(prefixes):
        prefix, conts = draw(L), [draw(n) for n in tails]
        row += [prefix, *conts]
        segments += [np.full(L + sum(tails), s + 1)]
        branches += [np.zeros(L, np.int32)] + [np.full(n, k + 1) for k, n in enumerate(tails)]
        alone = [np.asarray(model(jnp.asarray(np.concatenate([prefix, c])[None]))[0][0]) for c in conts]
        expected += [alone[0][:L]] + [a[L:] for a in alone]
    row, segments, branches = (np.concatenate(x + [np.zeros(pad, np.int32)])[None]
                               for x in (row, segments, branches))
    logits, _ = model(jnp.asarray(row), jnp.asarray((segments > 0).astype(np.int32)),
                      segments=jnp.asarray(segments), branches=jnp.asarray(branches))
    n = row.shape[1] - pad
    np.testing.assert_allclose(logits[0, :n], np.concatenate(expected), atol=1e-5)


def test_fully_padded_rows_are_finite(gpt):
    mask = jnp.zeros((B, T), jnp.int32).at[1].set(1)
    logits, hidden = gpt(_tokens(1), mask)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(hidden))


# ------------------------------------------------------------------- KV cache

@pytest.fixture(scope="module")
def cached(split):
    graphdef, _ = split

    @jax.jit
    def run(state, tokens, mask, cache):
        return nnx.merge(graphdef, state).decode(tokens, cache, mask)

    return run


def test_kv_cache_matches_full_forward(split, forward, cached):
    """Prefill a left-padded prompt, then decode token by token: every step's logits equal
    the full forward's logits at the same position."""
    _, state = split
    P = 5
    tokens = _tokens(11)
    pads = np.array([0, 2, 4])
    mask = (np.arange(T)[None, :] >= pads[:, None]).astype(np.int32)
    mask_j = jnp.asarray(mask)
    full = np.asarray(forward(state, tokens, mask_j))

    cache = init_cache(CFG, B, T)
    logits, cache = cached(state, tokens[:, :P], mask_j[:, :P], cache)
    np.testing.assert_allclose(np.asarray(logits)[mask[:, :P] > 0], full[:, :P][mask[:, :P] > 0],
                               atol=1e-4)
    for t in range(P, T):
        logits, cache = cached(state, tokens[:, t:t + 1], mask_j[:, t:t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-4)
    assert int(cache.index) == T
    np.testing.assert_array_equal(cache.length, mask.sum(1))


def test_kv_cache_last_only(gpt):
    cache = init_cache(CFG, B, T)
    last, _ = gpt.decode(_tokens(2), cache, last_only=True)
    full, _ = gpt(_tokens(2))
    assert last.shape == (B, 1, CFG.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-4)


# ------------------------------------------------------------------- scalar head

def test_scalar_head_init_statistics():
    cfg = ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=4, n_embd=1024)
    model = ScalarGPT.init(cfg, 0)
    kernel = np.asarray(model.head.kernel[...])
    assert kernel.shape == (1024, 1)
    assert np.std(kernel) == pytest.approx(1 / math.sqrt(1024 + 1), rel=0.1)
    assert abs(np.mean(kernel)) < 3 / math.sqrt(1024 + 1) / math.sqrt(1024) * 1.5
    assert np.all(model.head.bias[...] == 0)


def test_scalar_gpt_reads_the_trunk(gpt):
    model = ScalarGPT.from_gpt(gpt, seed=1)
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(gpt, nnx.Param)),
                                  nnx.to_flat_state(nnx.state(model.transformer, nnx.Param))):
        assert p1 == p2
        np.testing.assert_array_equal(v1[...], v2[...])
    tokens, mask = _tokens(4), jnp.ones((B, T), jnp.int32).at[0, :3].set(0)
    values = model(tokens, mask)
    assert values.shape == (B, T) and values.dtype == jnp.float32
    hidden = gpt.hidden_states(tokens, mask)
    expected = hidden @ model.head.kernel[...][:, 0] + model.head.bias[...][0]
    np.testing.assert_allclose(values, expected, atol=1e-5)
    # it really reads the trunk: perturb the trunk, the values move
    model.transformer.ln_f.bias[...] = model.transformer.ln_f.bias[...] + 1.0
    assert not np.allclose(model(tokens, mask), values, atol=1e-3)
    assert np.all(gpt.ln_f.bias[...] == 0)  # a copy, not shared



@functools.cache
def _at_and_full(remat: bool, attention: str):
    """Jitted (value, parameter gradients) of sum(w * head at `at`), computed by the full
    forward gathered at `at` and by `at` itself, for a ScalarGPT on the module's trunk."""
    model = ScalarGPT.init(dataclasses.replace(CFG, remat=remat, attention=attention), 1)
    graphdef, params = nnx.split(model)

    def via_full(p, tokens, mask, at, w):
        return jnp.sum(w * jnp.take_along_axis(nnx.merge(graphdef, p)(tokens, mask), at, axis=1))

    def via_at(p, tokens, mask, at, w):
        return jnp.sum(w * nnx.merge(graphdef, p)(tokens, mask, at=at))

    return params, jax.jit(jax.value_and_grad(via_full)), jax.jit(jax.value_and_grad(via_at))


@pytest.mark.parametrize("remat, attention", [(False, "manual"), (True, "manual"), (False, "xla")])
@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, T), min_size=B, max_size=B), seed=st.integers(0, 2**16))
def test_outputs_at_some_positions_equal_the_full_forward_there(remat, attention, lengths, seed):
    """`at` (the reward model reads one position per reply): the value and the parameter
    gradients of a loss on the head at those positions equal those of the full forward
    gathered there, on right-padded rows (a position may be padding, or repeated)."""
    params, via_full, via_at = _at_and_full(remat, attention)
    rng = np.random.default_rng(seed)
    tokens = _tokens(seed)
    mask = jnp.asarray(np.arange(T)[None] < np.array(lengths)[:, None], jnp.int32)
    at = jnp.asarray(rng.integers(0, T, (B, 3)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(B, 3)), jnp.float32)
    (l1, g1), (l2, g2) = via_full(params, tokens, mask, at, w), via_at(params, tokens, mask, at, w)
    np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-4)


def test_hidden_states_at_positions(gpt):
    tokens, at = _tokens(3), jnp.asarray([[0, 11], [5, 5], [11, 2]], jnp.int32)
    hidden = gpt.hidden_states(tokens, at=at)
    assert hidden.shape == (B, 2, CFG.n_embd)
    np.testing.assert_allclose(hidden, np.take_along_axis(np.asarray(gpt.hidden_states(tokens)),
                                                          np.asarray(at)[..., None], 1), atol=1e-5)

# ------------------------------------------------------------------- other paths

def _variant(split, **changes):
    graphdef, state = split
    cfg = dataclasses.replace(CFG, **changes)
    other_graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(other_graphdef, state)


def test_bfloat16_compute_close_to_float32(gpt, split):
    model = _variant(split, dtype="bfloat16")
    tokens, mask = _tokens(5), jnp.ones((B, T), jnp.int32).at[1, :4].set(0)
    ref, _ = gpt(tokens, mask)
    out, hidden = jax.jit(lambda m, t, k: m(t, k))(model, tokens, mask)
    assert out.dtype == jnp.float32 and hidden.dtype == jnp.float32
    assert model.h[0].attn.c_attn.kernel[...].dtype == jnp.float32  # params stay float32
    err = np.abs(np.asarray(out) - np.asarray(ref)).max()
    assert err < 0.05 * np.abs(np.asarray(ref)).max() + 1e-3
    cache = init_cache(model.config, B, T)
    assert cache.k[0].dtype == jnp.bfloat16
    logits, _ = model.decode(tokens, cache, mask)
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_xla_attention_equals_manual(gpt, split):
    model = _variant(split, attention="xla")
    tokens, mask = _tokens(6), jnp.ones((B, T), jnp.int32).at[2, :5].set(0)
    ref, _ = gpt(tokens, mask)
    out, _ = model(tokens, mask)
    m = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(out)[m], np.asarray(ref)[m], atol=1e-4)
    logits, _ = model.decode(tokens, init_cache(CFG, B, T), mask)
    np.testing.assert_allclose(np.asarray(logits)[m], np.asarray(ref)[m], atol=1e-4)


@pytest.mark.parametrize("changes", [{}, {"attention": "xla"}, {"remat": True}, {"dropout": 0.1}])
def test_no_mask_is_plain_causal_attention(split, monkeypatch, changes):
    # Without a mask the model skips building the (B, 1, T, T) mask and asks the library
    # kernels for their causal mode: values and gradients must equal an all-ones mask's.
    model = _variant(split, **changes)
    tokens, ones = _tokens(8), jnp.ones((B, T), jnp.int32)
    key = jax.random.key(3) if changes.get("dropout") else None

    def loss(m, mask):
        logits, _ = m(tokens, mask, dropout_key=key)
        return jnp.mean(logits ** 2)

    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **kw: calls.append((kw["mask"] is None, kw["is_causal"])) or real(*a, **kw))
    l_none, g_none = nnx.value_and_grad(loss)(model, None)
    l_ones, g_ones = nnx.value_and_grad(loss)(model, ones)
    np.testing.assert_allclose(float(l_none), float(l_ones), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_none), jax.tree.leaves(g_ones)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    if changes.get("attention") == "xla":  # causal mode without a mask, then the explicit mask
        assert calls == [(True, True)] * CFG.n_layer + [(False, False)] * CFG.n_layer
    else:
        assert calls == []


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's attention kernel runs on NVIDIA GPUs only")
def test_cudnn_attention_matches_manual_on_gpu(split):
    # Both in bf16, so the only difference is the kernel. Left padding makes whole query rows
    # masked: the library kernel must keep them finite, forward and backward, or PPO's and
    # SFT's padded batches would turn the gradients into NaN on a GPU.
    manual, cudnn = _variant(split, dtype="bfloat16"), _variant(split, dtype="bfloat16", attention="cudnn")
    tokens, mask = _tokens(7), jnp.ones((B, T), jnp.int32).at[1, :3].set(0)
    m = np.asarray(mask) > 0

    def loss(model):
        logits, _ = model(tokens, mask)
        return jnp.mean(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2), logits

    (l_ref, ref), g_ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(manual)
    (l_out, out), g_out = jax.jit(jax.value_and_grad(loss, has_aux=True))(cudnn)
    assert np.isfinite(np.asarray(out)).all()
    scale = np.abs(np.asarray(ref)[m]).max()
    assert np.abs(np.asarray(out)[m] - np.asarray(ref)[m]).max() < 0.02 * scale
    assert float(l_out) == pytest.approx(float(l_ref), rel=2e-2)
    for a, b in zip(jax.tree.leaves(nnx.state(g_out, nnx.Param)), jax.tree.leaves(nnx.state(g_ref, nnx.Param))):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all() and np.abs(a - b).max() <= 0.05 * np.abs(b).max() + 1e-6
    logits, _ = jax.jit(lambda mdl: mdl.decode(tokens, init_cache(mdl.config, B, T), mask))(cudnn)
    assert np.abs(np.asarray(logits)[m] - np.asarray(ref)[m]).max() < 0.02 * scale


def test_remat_gives_the_same_gradients(split):
    graphdef, state = split
    remat = _variant(split, remat=True)
    rgraphdef, _ = nnx.split(remat)
    tokens = _tokens(8)

    def loss(g):
        def f(params):
            logits = nnx.merge(g, params)(tokens)[0]
            return logprobs_from_logits(logits[:, :-1], tokens[:, 1:]).mean()
        return jax.jit(jax.grad(f))(state)

    a, b = loss(graphdef), loss(rgraphdef)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_dropout_applies_only_with_a_key_and_adds_no_state(gpt):
    model = GPT.init(dataclasses.replace(CFG, dropout=0.3), 0)
    # the same parameters as without dropout, and no random state beside them
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(gpt))
    tokens, key = _tokens(9), jax.random.key(1)
    plain, _ = gpt(tokens)
    np.testing.assert_array_equal(model(tokens)[0], plain)  # no key: evaluation, no dropout
    np.testing.assert_array_equal(gpt(tokens, dropout_key=key)[0], plain)  # rate 0: a key changes nothing
    a, b = model(tokens, dropout_key=key)[0], model(tokens, dropout_key=key)[0]
    np.testing.assert_array_equal(a, b)  # a function of the key
    assert not np.allclose(a, plain, atol=1e-3)
    assert not np.allclose(a, model(tokens, dropout_key=jax.random.key(2))[0], atol=1e-3)


@settings(max_examples=8)
@given(t=st.integers(0, T - 2), seed=st.integers(0, 2**16))
def test_dropout_keeps_causality(t, seed):
    """With one key, dropout masks depend on positions only: the future still never leaks."""
    model = GPT.init(dataclasses.replace(CFG, dropout=0.3), 0)
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x, k: nnx.merge(graphdef, s)(x, dropout_key=k)[0])
    tokens, key = _tokens(seed), jax.random.key(seed)
    changed = tokens.at[:, t + 1:].set(_tokens(seed + 1)[:, t + 1:])
    a, b = f(state, tokens, key), f(state, changed, key)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)


@pytest.mark.parametrize("attention", ["manual", "xla"])
def test_dropout_gradients_match_finite_differences_and_remat(attention):
    """The loss under one dropout key is a fixed function of the parameters: its gradient
    matches central differences, and remat (which recomputes the masks) gives the same."""
    cfg = dataclasses.replace(CFG, dropout=0.2, attention=attention)
    tokens, key = _tokens(4), jax.random.key(7)

    def make_loss(c):
        graphdef, state = nnx.split(GPT.init(c, 0))

        def loss(s):
            logits = nnx.merge(graphdef, s)(tokens, dropout_key=key)[0]
            return -logprobs_from_logits(logits[:, :-1], tokens[:, 1:]).mean()
        return loss, state

    loss, state = make_loss(cfg)
    grads = jax.jit(jax.grad(loss))(state)
    remat_loss, _ = make_loss(dataclasses.replace(cfg, remat=True))
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.jit(jax.grad(remat_loss))(state))):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # central differences along one random unit direction through every parameter
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda p: rng.normal(size=p.shape), state)
    norm = math.sqrt(sum(float(np.sum(d ** 2)) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: jnp.asarray(d / norm, jnp.float32), direction)
    eps = 1e-2
    shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, state, direction)
    numeric = (jax.jit(loss)(shifted(1)) - jax.jit(loss)(shifted(-1))) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


def test_logprobs_from_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7)).astype(np.float32) * 3
    tokens = rng.integers(0, 7, (4, 5))
    for temp in (1.0, 0.5):
        z = logits / temp
        ref = z - np.log(np.exp(z).sum(-1, keepdims=True))
        ref = np.take_along_axis(ref, tokens[..., None], -1)[..., 0]
        out = logprobs_from_logits(jnp.asarray(logits), jnp.asarray(tokens), temperature=temp)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref, atol=1e-5)


def _numpy_gpt2(sd: dict, tokens: np.ndarray, mask: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-2 written again in float64 NumPy from the Hugging Face-named state dict: the
    reference the model is checked against when torch is not installed (as in CI)."""
    sd = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in sd.items()}

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def linear(x, name):
        return x @ sd[f"{name}.weight"] + sd[f"{name}.bias"]

    B, T = tokens.shape
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # padding skipped, left or right
    x = sd["wte.weight"][tokens] + sd["wpe.weight"][positions]
    allowed = np.tril(np.ones((T, T), bool))[None] & (mask[:, None, :] > 0)  # (B, T, S)
    i = 0
    while f"h.{i}.ln_1.weight" in sd:
        q, k, v = np.split(linear(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, axis=-1)
        heads = lambda a: a.reshape(B, T, n_head, -1).transpose(0, 2, 1, 3)
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(allowed[:, None], scores, -np.inf)
        scores = np.where(allowed[:, None].any(-1, keepdims=True), scores, 0.0)  # no key: any value
        p = np.exp(scores - scores.max(-1, keepdims=True))
        y = (p / p.sum(-1, keepdims=True)) @ v
        x = x + linear(y.transpose(0, 2, 1, 3).reshape(B, T, -1), f"h.{i}.attn.c_proj")
        h = linear(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        x = x + linear(h, f"h.{i}.mlp.c_proj")
        i += 1
    return ln(x, "ln_f") @ sd["wte.weight"].T


def test_matches_a_numpy_gpt2_with_every_parameter_random(split):
    """Logits equal an independent float64 NumPy GPT-2 on right- and left-padded rows. Every
    parameter is random (GPT-2's init has zero biases and unit LayerNorm scales, which
    would hide a bias or a LayerNorm scale that is never applied)."""
    graphdef, state = split
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    noisy = [leaf + jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype) for leaf in leaves]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))
    tokens = np.asarray(_tokens(11))
    mask = np.ones((B, T), np.int32)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    ref = _numpy_gpt2(gpt2_state_dict(model), tokens, mask, CFG.n_head)
    out = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask))[0])
    real = mask > 0
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=1e-4)


def test_matches_huggingface_gpt2(gpt):
    """Same weights, same logits as transformers.GPT2LMHeadModel (when torch is installed)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=CFG.vocab_size, n_positions=CFG.block_size, n_embd=CFG.n_embd,
        n_layer=CFG.n_layer, n_head=CFG.n_head, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    )).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in gpt2_state_dict(gpt).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k for k in missing)
    hf.tie_weights()
    tokens = _tokens(10)
    with torch.no_grad():
        ref = hf(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()
    np.testing.assert_allclose(gpt(tokens)[0], ref, atol=1e-4)


def test_attention_hand_written_backward_matches_autodiff():
    """`attention`'s custom VJP equals JAX's derivative of the plain formula, padding included."""
    from minichat.model import _attention_weights, attention

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(kk, (2, 3, 10, 8)) for kk in keys)
    mask = jnp.ones((2, 10), bool).at[0, :3].set(False)
    allowed = jnp.tril(jnp.ones((10, 10), bool))[None, None] & mask[:, None, None, :]

    def plain(q, k, v):
        return jnp.einsum("bhts,bhsd->bhtd", _attention_weights(q, k, allowed), v)

    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
    np.testing.assert_allclose(attention(q, k, v, allowed), plain(q, k, v), atol=1e-5)
    got = jax.grad(loss(lambda q, k, v: attention(q, k, v, allowed)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("block", [4, 5])  # T = 12: blocks of 4 + 4 + 4, and of 5 + 5 + 2
def test_causal_block_skipping_is_exact(split, monkeypatch, block):
    """Query blocks that skip the keys after them give the same logits and gradients."""
    import minichat.model as model_module

    graphdef, state = split
    tokens, mask = _tokens(12), jnp.ones((B, T), jnp.int32).at[1, :5].set(0)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, mask)[0]
        both_real = mask[:, :-1] * mask[:, 1:]  # a padding query's output is arbitrary
        return jnp.sum(logprobs_from_logits(logits[:, :-1], tokens[:, 1:]) * both_real)

    run = lambda: jax.value_and_grad(loss)(state)  # traced anew: reads QUERY_BLOCK
    monkeypatch.setattr(model_module, "QUERY_BLOCK", block)
    blocked = run()
    monkeypatch.setattr(model_module, "QUERY_BLOCK", 10**9)
    whole = run()
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ---- dense: the flattened 2-D product and its hand-written backward pass -------------------------

@settings(max_examples=10)
@given(st.lists(st.integers(1, 5), min_size=0, max_size=2), st.integers(1, 9), st.integers(1, 9),
       st.integers(0, 2**31 - 1))
def test_dense_value_and_gradients_equal_autodiff_of_the_plain_product(lead, n_in, n_out, seed):
    from minichat.model import dense
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(*lead, n_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(*lead, n_out)), jnp.float32)  # a random cotangent
    ours = jax.value_and_grad(lambda x, w: jnp.sum(dense(x, w) * ct), argnums=(0, 1))(x, w)
    plain = jax.value_and_grad(lambda x, w: jnp.sum(jnp.dot(x, w) * ct), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # bfloat16 operands with float32 output: float32 results, gradients in the operands' type
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y = dense(xb, wb, jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, jnp.dot(xb, wb, preferred_element_type=jnp.float32), rtol=1e-6, atol=1e-6)
    gx, gw = jax.grad(lambda x, w: jnp.sum(dense(x, w, jnp.float32) * ct), argnums=(0, 1))(xb, wb)
    assert gx.dtype == gw.dtype == jnp.bfloat16
