"""Sampling: greedy equals a naive loop, logprobs match a full forward, end/pad/mask
semantics, top-k/top-p, sampling frequencies, no recompiles, the streaming API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from minichat.config import ModelConfig
from minichat.model import GPT, logprobs_from_logits
from minichat.sampling import (
    SHRINK,
    TRACE_COUNTS,
    decode_step,
    generate,
    inverse_cdf,
    prefill,
    sample_logits,
    sample_token,
)

CFG = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
B, P, N = 4, 6, 8
PAD = 0


@pytest.fixture(scope="module")
def gpt():
    return GPT.init(CFG, 1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (B, P))
    pads = np.array([0, 1, 3, 5])
    mask = (np.arange(P)[None, :] >= pads[:, None]).astype(np.int32)
    return jnp.asarray(np.where(mask > 0, tokens, PAD), jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope="module")
def forward(gpt):
    graphdef, _ = nnx.split(gpt)
    return jax.jit(lambda state, t, m: nnx.merge(graphdef, state)(t, m)[0])


def _gen(model, prompts, key=0, **kw):
    kw = {"max_new_tokens": N, "end_id": None, "pad_id": PAD, **kw}
    return generate(model, prompts[0], prompts[1], jax.random.key(key), **kw)


def test_greedy_equals_naive_argmax_loop(gpt, prompts, forward):
    """Reference path: re-run the full forward over prompt + generated tokens each step."""
    gen = _gen(gpt, prompts, temperature=0.0)
    tokens, mask = prompts
    state = nnx.state(gpt)
    for _ in range(N):
        logits = forward(state, tokens, mask)
        nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        tokens = jnp.concatenate([tokens, nxt[:, None]], 1)
        mask = jnp.concatenate([mask, jnp.ones((B, 1), jnp.int32)], 1)
    np.testing.assert_array_equal(gen.tokens, tokens[:, P:])
    np.testing.assert_array_equal(gen.mask, 1)
    # greedy logprobs are under softmax(logits)
    ref = logprobs_from_logits(forward(state, tokens, mask)[:, P - 1:-1], tokens[:, P:])
    np.testing.assert_allclose(gen.logprobs, ref, atol=1e-4)


def test_logprobs_equal_full_forward(gpt, prompts, forward):
    """logprobs = log softmax(logits / T) of a full forward over prompt + sampled tokens,
    before top-k filtering."""
    temperature = 0.7
    gen = _gen(gpt, prompts, key=3, temperature=temperature, top_k=5)
    tokens = jnp.concatenate([prompts[0], gen.tokens], 1)
    mask = jnp.concatenate([prompts[1], gen.mask], 1)
    logits = forward(nnx.state(gpt), tokens, mask)[:, P - 1:-1]
    ref = logprobs_from_logits(logits, gen.tokens, temperature=temperature)
    np.testing.assert_allclose(gen.logprobs, ref, atol=1e-4)
    # top-k: every sampled token is among the 5 most likely
    rank = (logits > jnp.take_along_axis(logits, gen.tokens[..., None], -1)).sum(-1)
    assert np.all(np.asarray(rank) < 5)


@pytest.mark.parametrize("n", [1, 3])
def test_n_samples_share_a_prefill_and_equal_repeated_prompts(gpt, prompts, n):
    """Several replies per prompt from one prefill: the same draws, token for token, as the
    prompts repeated row by row (same key, same row count), with their logprobs and masks."""
    shared = _gen(gpt, prompts, key=3, temperature=1.0, end_id=5, n_samples=n)
    repeated = _gen(gpt, tuple(jnp.repeat(x, n, axis=0) for x in prompts), key=3, temperature=1.0, end_id=5)
    assert shared.tokens.shape == (B * n, N)
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_array_equal(shared.mask, repeated.mask)
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5)
    if n > 1:  # the replies of one prompt differ from one another: not one reply copied
        assert any(len({tuple(r) for r in np.asarray(shared.tokens[b * n:(b + 1) * n])}) > 1 for b in range(B))
    with pytest.raises(ValueError, match="n_samples"):
        _gen(gpt, prompts, n_samples=0)


# A vocabulary of 8: a random model ends about one row in eight per step, so most rows end
# long before the longest, the case `shrink` is for.
FEW = ModelConfig(vocab_size=8, block_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def few_gpt():
    return GPT.init(FEW, 2)


def _few_prompts(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    pads = rng.integers(0, P, rows)
    mask = (np.arange(P)[None, :] >= pads[:, None]).astype(np.int32)
    return jnp.asarray(np.where(mask > 0, rng.integers(1, FEW.vocab_size, (rows, P)), PAD)), jnp.asarray(mask)


def _assert_same_generation(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert int(a.steps) == int(b.steps)


def test_shrinking_batch_decodes_the_same_replies(few_gpt):
    """Once at most 1/8 of the rows are still sampling, `shrink` decodes those alone: the
    same tokens, masks and steps as the whole batch to the end, logprobs up to rounding
    (another batch size, another summation order). The case is checked to take that path:
    some step leaves between 1 and B/8 rows sampling before the last."""
    rows, n_new = 32, 40
    prompts = _few_prompts(rows, 0)
    kw = {"max_new_tokens": n_new, "temperature": 1.0, "end_id": 3, "pad_id": PAD}
    whole = generate(few_gpt, *prompts, jax.random.key(1), shrink=False, **kw)
    shrunk = generate(few_gpt, *prompts, jax.random.key(1), shrink=True, **kw)
    _assert_same_generation(shrunk, whole)
    live = np.asarray(whole.mask).sum(1)[None, :] > np.arange(n_new)[:, None]  # (step, row)
    assert any(0 < n <= rows // SHRINK for n in live.sum(1)[:int(whole.steps)])
    # and by default on a CPU
    _assert_same_generation(generate(few_gpt, *prompts, jax.random.key(1), **kw), shrunk)


@settings(max_examples=8, deadline=None)
@given(shape=st.sampled_from([(13, 1), (12, 2)]), temperature=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 10_000))
def test_shrinking_batch_is_invisible(few_gpt, shape, temperature, seed):
    """The same replies with and without `shrink`, whatever the prompts and the draw, with
    13 rows (1 left to decode alone) or 6 prompts x 2 replies, greedy or sampled (few
    shapes: each is a compilation)."""
    rows, n = shape
    prompts = _few_prompts(rows, seed)
    kw = {"max_new_tokens": 24, "temperature": temperature, "end_id": 3, "pad_id": PAD, "n_samples": n}
    _assert_same_generation(generate(few_gpt, *prompts, jax.random.key(seed), shrink=True, **kw),
                            generate(few_gpt, *prompts, jax.random.key(seed), shrink=False, **kw))


def test_end_token_mask_and_padding(gpt, prompts):
    """Row-wise stop: mask is 1 up to and including end_id, tokens are pad_id after it,
    logprobs 0 after it."""
    greedy = _gen(gpt, prompts, temperature=0.0)
    end_id = int(greedy.tokens[0, 2])  # row 0 ends at its 3rd token (or earlier)
    gen = _gen(gpt, prompts, temperature=0.0, end_id=end_id)
    for b in range(B):
        row = np.asarray(greedy.tokens[b])
        hits = np.flatnonzero(row == end_id)
        stop = hits[0] + 1 if len(hits) else N
        assert stop <= 3 or b != 0
        np.testing.assert_array_equal(gen.tokens[b, :stop], row[:stop])
        np.testing.assert_array_equal(gen.tokens[b, stop:], PAD)
        np.testing.assert_array_equal(gen.mask[b], (np.arange(N) < stop).astype(np.int32))
        np.testing.assert_array_equal(gen.logprobs[b, stop:], 0.0)
        assert np.all(np.asarray(gen.logprobs[b, :stop]) < 0)
    # the loop runs until the last row ends, and no further
    assert int(gen.steps) == max(int(np.asarray(gen.mask[b]).sum()) for b in range(B))
    assert int(greedy.steps) == N  # no end token: all N steps


def test_all_rows_end_stops_early(gpt):
    """Identical prompts ending on their first token: everything after is padding."""
    prompt = jnp.ones((B, P), jnp.int32) * 7
    mask = jnp.ones((B, P), jnp.int32)
    first = _gen(gpt, (prompt, mask), temperature=0.0).tokens[0, 0]
    gen = _gen(gpt, (prompt, mask), temperature=0.0, end_id=int(first))
    np.testing.assert_array_equal(gen.tokens[:, 0], first)
    np.testing.assert_array_equal(gen.tokens[:, 1:], PAD)
    np.testing.assert_array_equal(gen.mask, np.eye(1, N, dtype=np.int32).repeat(B, 0))
    assert int(gen.steps) == 1  # the decode loop never ran: everything ended at once


def test_top_k_1_and_tiny_top_p_are_greedy(gpt, prompts):
    greedy = _gen(gpt, prompts, temperature=0.0).tokens
    np.testing.assert_array_equal(_gen(gpt, prompts, key=5, top_k=1).tokens, greedy)
    np.testing.assert_array_equal(_gen(gpt, prompts, key=6, top_p=1e-6).tokens, greedy)
    assert not np.array_equal(_gen(gpt, prompts, key=7, temperature=3.0).tokens, greedy)


def _chi_square_ok(counts, probs):
    n = counts.sum()
    keep = probs > 0
    assert np.all(counts[~keep] == 0)
    expected = probs[keep] * n
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = keep.sum() - 1
    return chi2 < dof + 5 * np.sqrt(2 * dof)  # ~5 sigma


def test_sampling_frequencies_match_softmax():
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    rows = 20000
    batch = jnp.tile(logits, (rows, 1))
    sample = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))
    p = np.asarray(jax.nn.softmax(logits))
    for kw, probs in [
        ({}, p),
        ({"temperature": 0.5}, np.asarray(jax.nn.softmax(logits / 0.5))),
        ({"top_k": 3}, np.where(p >= np.sort(p)[-3], p, 0)),
        ({"top_p": 0.6}, None),
    ]:
        if probs is None:  # top-p: the smallest top set with mass >= 0.6
            order = np.argsort(-p)
            n_keep = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)
            probs = np.zeros_like(p)
            probs[order[:n_keep]] = p[order[:n_keep]]
        probs = probs / probs.sum()
        tokens, lps = sample(batch, jax.random.key(len(kw) + 11), **kw)
        counts = np.bincount(np.asarray(tokens), minlength=8)
        assert _chi_square_ok(counts, probs), (kw, counts, probs * rows)
        scaled = logits / kw.get("temperature", 1.0)
        np.testing.assert_allclose(lps, jax.nn.log_softmax(scaled)[tokens], atol=1e-5)


def test_no_recompile_on_second_call(gpt, prompts):
    """New weights and a new key reuse the compiled sampler, via a GPT or (graphdef, state)."""
    _gen(gpt, prompts, temperature=0.9, top_p=0.9)
    before = TRACE_COUNTS["generate"]
    graphdef, state = nnx.split(gpt)
    state2 = jax.tree.map(lambda x: x * 1.01, state)
    a = _gen((graphdef, state2), prompts, key=1, temperature=0.9, top_p=0.9)
    b = _gen(nnx.merge(graphdef, state2), prompts, key=1, temperature=0.9, top_p=0.9)
    assert TRACE_COUNTS["generate"] == before
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_streaming_api_matches_generate(gpt, prompts):
    gen = _gen(gpt, prompts, key=2, temperature=0.8, top_k=10)
    logits, cache = prefill(gpt, prompts[0], prompts[1], max_len=P + N)
    key = jax.random.key(2)
    tokens, traces = [], []
    for step in range(N):
        tok, lp = sample_token(logits, jax.random.fold_in(key, step), temperature=0.8, top_k=10)
        np.testing.assert_allclose(lp, gen.logprobs[:, step], atol=1e-4)
        tokens.append(tok)
        logits, cache = decode_step(gpt, tok, cache)
        traces.append(TRACE_COUNTS["decode_step"])
    np.testing.assert_array_equal(np.stack(tokens, 1), gen.tokens)
    assert len(set(traces)) == 1  # the per-token step compiled at most once, never retraced


def test_inverse_cdf_never_draws_a_filtered_token():
    """Rows as top-k / top-p leave them (99% of 8,192 weights 0), and u at the places where
    XLA's tree-order float32 cumsum dips by a rounding step: counting the cumulative weights
    <= u * total (the textbook inverse CDF) lands on a zero-weight token there; the sampler's
    rule never does, and elsewhere it is the textbook token."""
    rng = np.random.default_rng(2)
    R, V = 64, 8192
    w = np.exp(rng.normal(size=(R, V)) * 3).astype(np.float32)
    w[rng.random((R, V)) < 0.99] = 0
    cdf = np.asarray(jax.jit(lambda w: jnp.cumsum(w, -1))(w))
    rows, us = [], []
    for b in range(R):
        for i in np.flatnonzero(np.diff(cdf[b]) < 0):  # a dip between i and i + 1
            for c in (cdf[b, i], cdf[b, i + 1]):
                for v in (np.nextafter(c, 0, dtype=np.float32), c, np.nextafter(c, np.inf, dtype=np.float32)):
                    if v < cdf[b, -1]:
                        rows.append(b)
                        us.append(np.float32(v / cdf[b, -1]))
    rows, us = np.array(rows), np.array(us, np.float32)
    textbook = np.minimum((cdf[rows] <= (us * cdf[rows, -1])[:, None]).sum(-1), V - 1)
    assert (w[rows, textbook] == 0).sum() > 0  # the hazard is real on these rows
    drawn = np.asarray(jax.jit(inverse_cdf)(jnp.asarray(w[rows]), jnp.asarray(us[:, None])))
    assert np.all(w[rows, drawn] > 0)
    # elsewhere it is the textbook token: small rows whose cumsum rises monotonically
    w = np.exp(rng.normal(size=(8, 64)) * 2).astype(np.float32)
    w[:, ::3] = 0
    cdf = np.asarray(jax.jit(lambda w: jnp.cumsum(w, -1))(w))
    assert (np.diff(cdf, axis=1) >= 0).all()
    u = np.linspace(0, 1, 513, dtype=np.float32)[:-1]
    b, uu = np.repeat(np.arange(8), len(u)), np.tile(u, 8)
    want = np.minimum((cdf[b] <= (uu * cdf[b, -1])[:, None]).sum(-1), 63)
    np.testing.assert_array_equal(jax.jit(inverse_cdf)(jnp.asarray(w[b]), jnp.asarray(uu[:, None])), want)
