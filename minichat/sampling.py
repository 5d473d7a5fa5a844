"""Sampling from a GPT: one jit-compiled function, the whole decode loop on device.

Batch generation (PPO rollouts, evaluation):

    gen = generate(model, prompts, prompt_mask, key, max_new_tokens=64,
                   temperature=1.0, top_k=0, top_p=1.0, end_id=END, pad_id=PAD)
    gen.tokens    (B, N) int32    sampled tokens; pad_id after a row's end token
    gen.logprobs  (B, N) float32  log-prob of each sampled token under the
                                  temperature-scaled distribution softmax(logits / T),
                                  BEFORE top-k / top-p filtering (so it is the policy's
                                  log-prob, which is what PPO needs); 0 where mask is 0.
                                  With temperature 0 (greedy) it is under softmax(logits).
    gen.mask      (B, N) int32    1 for generated tokens up to and including end_id
    gen.steps     () int32        tokens sampled per row; the loop stops once every row
                                  has ended, so it is below N when all end early

`prompts` are LEFT-padded (B, P) int32 with `prompt_mask` (B, P) (1 = real token), so that
every row's last prompt token sits in the last column and all rows decode in lockstep.
The prompt is run through the model once ("prefill") to fill a fixed-size KV cache of
P + N slots; then a `lax.while_loop` samples one token per step for every row, feeding
it back through `GPT.decode`, and stops early once every row has emitted `end_id`.
`end_id=None` never stops early. `n_samples=K` samples K replies per prompt from one
prefill (the prompt's cache is copied K times); the outputs then have B * K rows. On a
CPU, once only 1/8 of the rows are still sampling, those are decoded alone (`shrink`):
replies end at different lengths, and a CPU step costs in proportion to its rows.

`model` is a live `GPT` or a `(graphdef, state)` pair from `nnx.split`; either way the
jitted function takes the graphdef as a static argument and the state as an array
argument, so it compiles once per (graphdef, shapes, sampling settings) and later calls
(e.g. every PPO iteration, with new weights) reuse the compiled code. `TRACE_COUNTS`
counts traces, for tests.

Sampling settings: temperature == 0 is greedy (argmax); top_k = 0 and top_p = 1.0 are
disabled; they are applied in that order (temperature, top-k, top-p), as in Hugging Face.
The token is drawn by inverse-CDF sampling (one uniform per row, a cumulative sum and a
count), which is several times cheaper on CPU than `jax.random.categorical` (one Gumbel
per vocabulary entry). Top-p finds its probability threshold by bisection on the float
bits instead of sorting the vocabulary (a sort of 8192 entries per row is slow on CPU).

Streaming, one token at a time (the interactive chat):

    logits, cache = prefill(model, prompts, prompt_mask, max_len=P + N)   # (B, V)
    for step in range(N):
        tok, lp = sample_token(logits, jax.random.fold_in(key, step),
                               temperature=0.8, top_k=50, top_p=0.95)      # (B,), (B,)
        ... print tok[0] as it arrives; stop on end_id ...
        logits, cache = decode_step(model, tok, cache)                     # (B, V)

Each of the three is jitted (prefill compiles once per prompt shape: pad prompts to a few
bucket lengths to bound compiles). `decode_step` donates the cache: do not reuse the cache
you passed in. `max_len` may not exceed the model's block_size.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minichat.model import KVCache, init_cache, logprobs_from_logits

TRACE_COUNTS: collections.Counter = collections.Counter()
SHRINK = 8  # `generate(shrink=True)`: the ended rows are dropped once 1/8 of the batch is left


class Generation(NamedTuple):
    tokens: jax.Array  # (B, N) int32, pad_id after a row's end token
    logprobs: jax.Array  # (B, N) float32, log p_T(token) before top-k/top-p; 0 where mask 0
    mask: jax.Array  # (B, N) int32, 1 up to and including the end token
    # () int32, tokens sampled per row: < N when every row ended early (None for rollouts
    # built elsewhere, e.g. PPO on given replies)
    steps: jax.Array | None = None


class SamplingSettings(NamedTuple):
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


# --------------------------------------------------------------------------- one token


def _top_p_threshold(probs, top_p):
    """Smallest probability t such that the tokens with p >= t carry >= top_p mass.

    Found by bisection on the int32 bit pattern of float32 t (monotone for t >= 0):
    31 masked sums over the vocabulary instead of a sort. Exact.
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

    def mass_from(threshold_bits):  # (B,) -> (B,)
        return jnp.sum(jnp.where(bits >= threshold_bits[:, None], probs, 0.0), axis=-1)

    def body(_, lo_hi):
        lo, hi = lo_hi  # invariant: mass_from(lo) >= top_p; answer in [lo, hi)
        mid = lo + (hi - lo) // 2
        ok = mass_from(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    B = probs.shape[0]
    lo = jnp.zeros((B,), jnp.int32)
    hi = jnp.max(bits, axis=-1) + 1
    lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return lo  # bits of the threshold


def inverse_cdf(weights, u):
    """The token whose slice of the cumulative weights holds u * total, per row: weights
    (B, V) >= 0, u (B, 1) uniform in [0, 1). One cumsum instead of `jax.random.categorical`'s
    V Gumbel draws and a log per row.

    The first token with weight > 0 whose cumulative weight exceeds u * total. Asking for
    weight > 0 matters: XLA sums in tree order, so the float32 cumsum can dip by a rounding
    step, and counting the entries <= u would then land on a token that top-k / top-p
    filtered out (about once in 10^6 draws at V = 8192).
    """
    cdf = jnp.cumsum(weights, axis=-1)
    hit = (cdf > u * cdf[:, -1:]) & (weights > 0)
    return jnp.where(hit.any(axis=-1), jnp.argmax(hit, axis=-1),
                     jnp.argmax(weights, axis=-1)).astype(jnp.int32)


def sample_logits(logits, key, *, temperature=1.0, top_k=0, top_p=1.0, u=None):
    """Draw one token per row. logits (B, V) -> (tokens (B,) int32, logprobs (B,) float32).

    logprobs are log softmax(logits / temperature) at the drawn token (before filtering;
    with temperature 0, log softmax(logits)). `u`: the rows' uniforms (B, 1), if the caller
    draws them (`_generate` does, so that a row's draw does not depend on the batch around
    it); by default `jax.random.uniform(key, (B, 1))`.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, logprobs_from_logits(logits, tokens)
    scaled = logits / temperature if temperature != 1.0 else logits
    shifted = scaled - jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.exp(shifted)  # unnormalised probabilities
    logz = jnp.log(jnp.sum(weights, axis=-1))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(shifted, top_k)[0][:, -1:]
        weights = jnp.where(shifted >= kth, weights, 0.0)
    if top_p < 1.0:
        probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
        threshold_bits = _top_p_threshold(probs, top_p)
        keep = jax.lax.bitcast_convert_type(probs, jnp.int32) >= threshold_bits[:, None]
        weights = jnp.where(keep, weights, 0.0)
    u = jax.random.uniform(key, (logits.shape[0], 1)) if u is None else u
    tokens = inverse_cdf(weights, u)
    picked = jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0]
    return tokens, picked - logz


# --------------------------------------------------------------------------- the loop


def _split(model):
    if isinstance(model, tuple):
        return model
    return nnx.split(model)


def _map_rows(cache: KVCache, f) -> KVCache:
    """`f` applied to each of the cache's per-row arrays (all but the shared `index`)."""
    return cache._replace(k=tuple(map(f, cache.k)), v=tuple(map(f, cache.v)),
                          mask=f(cache.mask), length=f(cache.length))


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "settings", "n_samples", "shrink"),
)
def _generate(graphdef, state, prompts, prompt_mask, key, *, max_new_tokens, settings,
              end_id, pad_id, n_samples=1, shrink=False):
    TRACE_COUNTS["generate"] += 1
    model = nnx.merge(graphdef, state)
    P = prompts.shape[1]
    N = max_new_tokens
    sample = functools.partial(sample_logits, **settings._asdict())

    cache = init_cache(model.config, prompts.shape[0], P + N)
    logits, cache = model.decode(prompts, cache, prompt_mask, last_only=True)
    if n_samples > 1:
        # Several replies per prompt share one prefill: the prompt's cache and next-token
        # logits are copied n times (rows prompt-major), only the replies are decoded apart.
        rep = lambda x: jnp.repeat(x, n_samples, axis=0)
        logits, cache = rep(logits), _map_rows(cache, rep)
    B = logits.shape[0]
    # One uniform per row of the *whole* batch at every step, each row taking its own: a
    # row draws the same token however many rows decode beside it (see `shrink` below).
    uniforms = lambda i: jax.random.uniform(jax.random.fold_in(key, i), (B, 1))
    token, logprob = sample(logits[:, -1], None, u=uniforms(0))
    done = token == end_id  # end_id < 0: never stops
    out = Generation(
        tokens=jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(token),
        logprobs=jnp.zeros((B, N), jnp.float32).at[:, 0].set(logprob),
        mask=jnp.zeros((B, N), jnp.int32).at[:, 0].set(1),
    )

    def body(carry):
        i, rows, cache, token, done, out = carry  # rows: which output row each row writes
        logits, cache = model.decode(token[:, None], cache)
        token, logprob = sample(logits[:, -1], None, u=uniforms(i)[rows])
        live = ~done  # this row had not ended before step i
        token = jnp.where(live, token, pad_id)
        out = Generation(tokens=out.tokens.at[rows, i].set(token),
                         logprobs=out.logprobs.at[rows, i].set(jnp.where(live, logprob, 0.0)),
                         mask=out.mask.at[rows, i].set(live.astype(jnp.int32)))
        done = done | (token == end_id)
        return i + 1, rows, cache, token, done, out

    # Most replies end long before the longest: on ChatWorld a batch of 128 samples runs
    # ~44 steps for ~16 tokens per row, so two thirds of a fixed batch's work decodes rows
    # that have ended, and on a CPU a step's cost grows with its rows. With `shrink`, once
    # at most B / 8 rows are still sampling they are gathered into a batch of B / 8 (cache
    # and all) and the loop goes on with those alone; the outputs are scattered back to
    # the rows' places. One more while_loop to compile (~1 s), not one per halving: on
    # 2,048 comparison prompts, halvings down to 8 rows were 1.2x faster once compiled but
    # no faster counting their compilation (benchmarks/README.md, sampling).
    small = B // SHRINK if shrink else 0  # 0 (or fewer than 8 rows): one loop, as without
    carry = (jnp.asarray(1, jnp.int32), jnp.arange(B), cache, token, done, out)
    carry = jax.lax.while_loop(lambda c: (c[0] < N) & (jnp.sum(~c[4]) > small), body, carry)
    if small:
        i, rows, cache, token, done, out = carry
        keep = jnp.argsort(done, stable=True)[:small]  # the rows still sampling come first
        carry = (i, rows[keep], _map_rows(cache, lambda x: x[keep]), token[keep], done[keep], out)
        carry = jax.lax.while_loop(lambda c: (c[0] < N) & ~jnp.all(c[4]), body, carry)
    steps, *_, out = carry
    return out._replace(steps=steps)  # the loop's counter: tokens sampled per row


def generate(model, prompts, prompt_mask, key, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             end_id: int | None, pad_id: int, n_samples: int = 1,
             shrink: bool | None = None) -> Generation:
    """Sample up to `max_new_tokens` per row after LEFT-padded `prompts` (B, P).

    `model`: a `GPT` or a `(graphdef, state)` pair. See the module docstring.
    `n_samples` > 1: that many replies per prompt from one prefill; the outputs have
    B * n_samples rows, prompt-major (row b * n_samples + j is prompt b's reply j), and
    equal those of the prompts repeated with `np.repeat(prompts, n_samples, axis=0)`.
    `shrink`: once at most 1/8 of the rows are still sampling, decode those alone (see
    `_generate`): the same result, 1.45x faster on ChatWorld's replies once compiled (1.15x
    counting the compilation of its second loop). None = on a CPU, where a step's cost
    grows with its rows, and only with an `end_id`; an accelerator's decode step costs
    about the same for 16 rows as for 128.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    graphdef, state = _split(model)
    settings = SamplingSettings(float(temperature), int(top_k), float(top_p))
    if shrink is None:
        shrink = end_id is not None and jax.default_backend() == "cpu"
    return _generate(
        graphdef, state, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
        key, max_new_tokens=int(max_new_tokens), settings=settings,
        end_id=jnp.asarray(-1 if end_id is None else end_id, jnp.int32),
        pad_id=jnp.asarray(pad_id, jnp.int32), n_samples=int(n_samples),
        shrink=bool(shrink),
    )


# --------------------------------------------------------------------------- streaming


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, prompts, prompt_mask, *, max_len):
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, prompts.shape[0], max_len)
    logits, cache = model.decode(prompts, cache, prompt_mask, last_only=True)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(graphdef, state, tokens, cache):
    TRACE_COUNTS["decode_step"] += 1
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(tokens[:, None], cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _sample_token(logits, key, *, temperature, top_k, top_p):
    return sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)


def prefill(model, prompts, prompt_mask, *, max_len: int) -> tuple[jax.Array, KVCache]:
    """Run left-padded prompts (B, P) into a fresh cache of `max_len` slots.
    Returns (next-token logits (B, V) float32, cache)."""
    graphdef, state = _split(model)
    return _prefill(graphdef, state, jnp.asarray(prompts, jnp.int32),
                    jnp.asarray(prompt_mask, jnp.int32), max_len=int(max_len))


def decode_step(model, tokens, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (B,) int32; returns (next logits (B, V), cache). The input
    cache is donated (invalid afterwards)."""
    graphdef, state = _split(model)
    return _decode_step(graphdef, state, jnp.asarray(tokens, jnp.int32), cache)


def sample_token(logits, key, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Jitted `sample_logits`: (B, V) logits -> (tokens (B,), logprobs (B,))."""
    return _sample_token(logits, key, temperature=float(temperature), top_k=int(top_k),
                         top_p=float(top_p))
