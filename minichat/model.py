"""GPT-2, written out in Flax NNX: the decoder that every stage of minichat trains.

Architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners";
the code mirrors nanoGPT's model.py and uses GPT-2's parameter names):

    x_0     = wte[tokens] + wpe[positions]                      token + learned position
    for each block i = 1..L  (pre-LayerNorm residual blocks, `h.{i}`):
        a   = attn(ln_1(x))            x = x + dropout(a)
        m   = mlp(ln_2(x))             x = x + dropout(m)
    h       = ln_f(x)                                           final LayerNorm
    logits  = h · wteᵀ                                          tied input/output embedding

    attn(x): [Q K V] = x · W_attn + b_attn                      `attn.c_attn`, fused qkv
             per head: softmax(Q Kᵀ / sqrt(d) + M) V            M = 0 where allowed, -inf else
             concat heads · W_proj + b_proj                     `attn.c_proj`
    mlp(x):  gelu_tanh(x · W_fc + b_fc) · W_proj + b_proj       `mlp.c_fc` (C -> 4C), `mlp.c_proj`
    gelu_tanh(x) = x/2 · (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))

The mask M lets query t see key s iff s <= t (causal) and key s is a real token (not
padding). Padding may sit on the left (prompts for sampling) or the right (training
batches); positions are `clip(cumsum(mask) - 1, 0)`, so a left-padded row sees exactly
the positions and keys of the unpadded row and gives the same logits at its real tokens.
A query that is itself padding may see no key at all; masked scores use a large finite
negative number rather than -inf, so such rows give a harmless uniform average, not NaN.

Attention (`config.attention`): "manual" (default) is the formula above written out in
the (B, H, T, D) layout, with a hand-written backward pass (`attention`, a custom VJP) and,
in the full forward, query blocks of 64 that skip the keys after them (the masked upper
triangle): together ~3x faster to train on CPU than the autodiff of the plain formula.
"xla" | "cudnn" call `jax.nn.dot_product_attention` with the same explicit mask.

Initialisation is GPT-2's: weights ~ N(0, 0.02), biases 0, LayerNorm (1, 0), and the two
projections that write into the residual stream (`attn.c_proj`, `mlp.c_proj`) scaled by
1/sqrt(2L), because the residual stream sums 2L of them.

Precision: parameters are float32; matmul operands are in `config.dtype` (float32 or
bfloat16) and their results float32, so the residual stream, LayerNorm, GELU, the attention
softmax and the logits are all float32.

Decoding uses a fixed-size KV cache (`KVCache`, one (B, H, Tmax, D) key and value array
per layer, written in place with `lax.dynamic_update_slice`): `init_cache` makes an empty
one and `GPT.decode(tokens, cache, mask)` runs a chunk of tokens (a whole prompt, or one
token) against it and returns the logits and the updated cache. `minichat.sampling`
builds the jit-compiled sampling loop on top of it.

`ScalarGPT` is the same trunk with a scalar head (one float per position): the reward
model reads it at the last token, the PPO value model at every reply token. Both ask for
those positions only (`at`), and the last block then runs there alone: its output at any
other position would feed nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minichat.config import ATTENTION, DTYPES, ModelConfig

# Masked attention scores are set to this instead of -inf, so that a query row with no
# visible key (a padding query) softmaxes to a uniform average instead of NaN.
_MASKED = -1e9


# --------------------------------------------------------------------------- dense products

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x, w, out_dtype=None):
    """x (..., I) · w (I, O) -> (..., O), as ONE 2-D matrix product, forward and backward.

    Autodiff of the batched product contracts the weight gradient over all leading axes of x
    at once, which XLA:CPU lowers to a transpose copy plus a matmul; flattening x to (N, I)
    gives plain (N, I)ᵀ·(N, O) and (N, O)·(O, I) GEMMs instead. Measured on the tiny train
    step (16 x 128 tokens, 2 cores): 14.2k -> 17.1k tokens/s with every linear layer and the
    unembedding on this path. `out_dtype` is the accumulation / output type (e.g. float32
    logits from bfloat16 operands); None = the operands' type.
    """
    return _dense_fwd(x, w, out_dtype)[0]


def _dense_fwd(x, w, out_dtype):
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())),
                            preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1]), (x, w)


def _dense_bwd(out_dtype, residuals, g):
    x, w = residuals
    g2 = g.reshape(-1, g.shape[-1]).astype(w.dtype)
    dx = jax.lax.dot_general(g2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g2, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _linear_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None, **_):
    """`nnx.Linear`'s product routed through `dense` (Linear always contracts x's last axis
    with the kernel's first), with a float32 result whatever the operands' type.

    So with `dtype=bfloat16` only the matmuls run in bfloat16, and GELU, the attention
    softmax and everything else elementwise stay float32. On CPU this is also the fast way:
    XLA:CPU runs bf16 GEMMs on AMX at 3-5x its fp32 rate, but has no bf16 vector arithmetic
    (tanh-GELU on 4096 x 512 takes 3.4 ms in bf16, 1.0 ms in fp32, on a Sapphire Rapids core).
    """
    assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return dense(x, w, jnp.float32)


@dataclasses.dataclass(unsafe_hash=True)
class StaticModelConfig(ModelConfig):
    """A hashable `ModelConfig`: NNX keeps plain attributes in the (hashable) graphdef,
    which `jax.jit` takes as a static argument. Treat it as read-only."""


def _static(config) -> StaticModelConfig:
    if isinstance(config, StaticModelConfig):
        return config
    if dataclasses.is_dataclass(config):
        return StaticModelConfig(**dataclasses.asdict(config))
    return StaticModelConfig(**dict(config))  # a mapping, e.g. an OmegaConf DictConfig


def _dtype(name: str):
    return dict(zip(DTYPES, (jnp.float32, jnp.bfloat16, jnp.float16)))[name]


def positions_from_mask(mask: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    """Position ids that skip padding: the first real token of every row gets 0.

    With `segments` (B, T) ids of packed sequences, positions restart at 0 where each
    segment begins, so a sequence packed behind others is embedded as if it were alone.
    """
    count = jnp.cumsum(mask.astype(jnp.int32), axis=-1)
    if segments is not None:
        T = segments.shape[-1]
        starts = jnp.concatenate([jnp.ones_like(segments[..., :1], bool),
                                  segments[..., 1:] != segments[..., :-1]], axis=-1)
        first = jax.lax.cummax(jnp.where(starts, jnp.arange(T), 0), axis=segments.ndim - 1)
        before = jnp.take_along_axis(count - mask.astype(jnp.int32), first, axis=-1)
        count = count - before  # real tokens of this segment up to and including t
    return jnp.maximum(count - 1, 0)


# --------------------------------------------------------------------------- KV cache


class KVCache(NamedTuple):
    """Fixed-size key/value cache (a pytree; nothing in it changes shape while decoding).

    k, v:   one (B, H, Tmax, D) array per layer, in the compute dtype.
    mask:   (B, Tmax) int32, 1 where the slot holds a real (non-padding) token.
    length: (B,) int32, the number of real tokens seen so far per row (next position id).
    index:  () int32, the number of slots written (the same for every row).
    """

    k: tuple
    v: tuple
    mask: jax.Array
    length: jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` rows and up to `max_len` tokens (prompt + new)."""
    if max_len > config.block_size:
        raise ValueError(f"max_len={max_len} exceeds block_size={config.block_size}")
    dtype = dtype or _dtype(config.dtype)
    head_dim = config.n_embd // config.n_head
    shape = (batch_size, config.n_head, max_len, head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
        mask=jnp.zeros((batch_size, max_len), jnp.int32),
        length=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


# --------------------------------------------------------------------------- modules


def _normal(std):
    return nnx.initializers.normal(stddev=std)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        C, dt = config.n_embd, _dtype(config.dtype)
        assert C % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.implementation = config.attention
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_attn = nnx.Linear(C, 3 * C, dtype=dt, dot_general=_linear_dot_general,
                                 kernel_init=_normal(0.02), rngs=rngs)
        self.c_proj = nnx.Linear(C, C, dtype=dt, dot_general=_linear_dot_general,
                                 kernel_init=_normal(residual_std), rngs=rngs)
        self.attn_dropout = nnx.Dropout(config.dropout)
        self.resid_dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, allowed, *, dropout_key=None, kv=None, index=None,
                 causal_blocks=False, at=None):
        """x: (B, T, C). allowed: (B, 1, T, S) bool, may query t see key s; None = plain
        causal attention over unpadded rows (no cache).
        `causal_blocks`: `allowed` is causal (S == T, no cache), so blocks of queries can
        skip the keys after them. `dropout_key`: dropout on the attention weights and the
        output (None = none). `at`: (B, E) int, query only from these positions (every
        position still serves as a key); the output is (B, E, C).

        Without a cache S == T. With `kv = (k_cache, v_cache)` (B, H, Tmax, D) the new
        keys/values are written at slots [index, index + T) and the queries attend over
        all Tmax slots (S == Tmax); returns (y, (k_cache, v_cache)).
        """
        B, T, C = x.shape
        H = self.n_head
        qkv = self.c_attn(x).reshape(B, T, 3, H, C // H)
        # (B, H, T, D): XLA on CPU runs these batched matmuls ~3x faster than (B, T, H, D).
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        if at is not None:
            q = jnp.take_along_axis(q, at[:, None, :, None], axis=2)
            allowed = jnp.take_along_axis(allowed, at[:, None, :, None], axis=2)
        Tq = q.shape[2]
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
            kv = (k, v)
        attn_key, resid_key = _split(dropout_key, 2)
        use_dropout = attn_key is not None and self.attn_dropout.rate > 0
        if allowed is None and (use_dropout or self.implementation == "manual"):
            allowed = jnp.tril(jnp.ones((T, T), bool))[None, None]  # the written-out paths read a mask
        if use_dropout:
            # dropout on the attention weights: the plain formula, differentiated by JAX
            # (neither the hand-written backward nor the library kernels have a dropout)
            weights = _attention_weights(q, k, allowed).astype(v.dtype)
            weights = _dropout(self.attn_dropout, weights, attn_key)
            y = jnp.einsum("bhts,bhsd->bhtd", weights, v)
        elif self.implementation == "manual":
            y = self._attend(q, k, v, allowed, causal_blocks)
        else:  # "xla" | "cudnn": the library kernel, in the compute dtype, (B, T, H, D) layout
            q, k, v = (a.astype(self.c_attn.dtype).transpose(0, 2, 1, 3) for a in (q, k, v))
            y = jax.nn.dot_product_attention(
                q, k, v,
                mask=allowed, is_causal=allowed is None, implementation=self.implementation,
            ).transpose(0, 2, 1, 3)
        y = y.transpose(0, 2, 1, 3).reshape(B, Tq, C)
        y = _dropout(self.resid_dropout, self.c_proj(y), resid_key)
        return y, kv

    def _attend(self, q, k, v, allowed, causal_blocks):
        T = q.shape[2]
        if not causal_blocks or T <= QUERY_BLOCK:
            return attention(q, k, v, allowed)
        # Causal, so the queries of block [a, b) see only keys [0, b): skip the blocks above
        # the diagonal (they are all masked), which saves almost half the work. The last
        # block may be shorter (SFT's packed rows are 143 tokens: 64 + 64 + 15).
        out = []
        for a in range(0, T, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, T)
            out.append(attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], allowed[:, :, a:b, :b]))
        return jnp.concatenate(out, axis=2)


QUERY_BLOCK = 64  # query block size for skipping the masked half of causal attention


def _attention_weights(q, k, allowed):
    """P = softmax(Q Kᵀ / sqrt(d) + M), float32. q: (B,H,T,D), k: (B,H,S,D)."""
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    scores = jnp.einsum("bhtd,bhsd->bhts", q * scale, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed, scores, _MASKED)
    return jax.nn.softmax(scores, axis=-1)


@jax.custom_vjp
def attention(q, k, v, allowed):
    """O = softmax(Q Kᵀ / sqrt(d) + M) V, written out.

    q: (B, H, T, D); k, v: (B, H, S, D); allowed: (B, 1, T, S) bool (M = 0 where allowed,
    a large negative number elsewhere). The backward pass is written by hand (below):
    JAX's automatic derivative of softmax makes several more passes over the (T, S)
    score matrix, and is ~2x slower on CPU.
    """
    return _attention_fwd(q, k, v, allowed)[0]


def _attention_fwd(q, k, v, allowed):
    p = _attention_weights(q, k, allowed).astype(v.dtype)
    o = jnp.einsum("bhts,bhsd->bhtd", p, v)
    return o, (q, k, v, allowed, p, o)


def _attention_bwd(residuals, do):
    """With S = Q Kᵀ/sqrt(d) + M, P = softmax(S), O = P V and dO = dL/dO:

        dV = Pᵀ dO      dP = dO Vᵀ      dS = P ⊙ (dP - rowsum(dO ⊙ O))
        dQ = dS K / sqrt(d)             dK = dSᵀ Q / sqrt(d)

    (rowsum(dO ⊙ O) = rowsum(P ⊙ dP), the softmax Jacobian, computed over D not S;
    dS = 0 off the mask.)
    """
    q, k, v, allowed, p, o = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = jnp.einsum("bhts,bhtd->bhsd", p, do)
    dp = jnp.einsum("bhtd,bhsd->bhts", do, v).astype(jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    # masked scores are a constant: no gradient (this matters only for a query row with no
    # visible key, whose P is uniform rather than 0 off the mask)
    ds = jnp.where(allowed, p.astype(jnp.float32) * (dp - delta) * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("bhts,bhsd->bhtd", ds, k)
    dk = jnp.einsum("bhts,bhtd->bhsd", ds, q)
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        C, dt = config.n_embd, _dtype(config.dtype)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_fc = nnx.Linear(C, 4 * C, dtype=dt, dot_general=_linear_dot_general,
                               kernel_init=_normal(0.02), rngs=rngs)
        self.c_proj = nnx.Linear(4 * C, C, dtype=dt, dot_general=_linear_dot_general,
                                 kernel_init=_normal(residual_std), rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, *, dropout_key=None):
        h = jax.nn.gelu(self.c_fc(x), approximate=True)  # tanh GELU, as GPT-2
        return _dropout(self.dropout, self.c_proj(h), dropout_key)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm with float32 statistics and output (GPT-2's epsilon, 1e-5)."""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(config.n_embd, rngs=rngs)
        self.attn = CausalSelfAttention(config, rngs=rngs)
        self.ln_2 = LayerNorm(config.n_embd, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, allowed, *, dropout_key=None, kv=None, index=None, at=None):
        """`at`: (B, E) int, compute the block's output at these positions only (B, E, C)."""
        attn_key, mlp_key = _split(dropout_key, 2)
        a, kv = self.attn(self.ln_1(x), allowed, dropout_key=attn_key, kv=kv,
                          index=index, causal_blocks=kv is None and at is None, at=at)
        if at is not None:
            x = jnp.take_along_axis(x, at[..., None], axis=1)
        x = x + a
        x = x + self.mlp(self.ln_2(x), dropout_key=mlp_key)
        return x, kv


def _block_forward(block, x, allowed, dropout_key, at=None):
    return block(x, allowed, dropout_key=dropout_key, at=at)[0]


# the backward pass recomputes the block, dropout masks included (same key, same mask)
_block_forward_remat = nnx.remat(_block_forward)


def _split(key, n: int) -> tuple:
    """`n` independent keys from `key`, or `n` Nones without one (no dropout)."""
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


def _dropout(layer: nnx.Dropout, x, key):
    """Inverted dropout with an explicit key (None = identity, as at evaluation).

    The modules hold no random state: each training step passes one key (from the seed
    and the step number) that is split per layer, so a resumed run draws the same masks
    as an uninterrupted one, and checkpoints hold parameters only."""
    return x if key is None else layer(x, deterministic=False, rngs=key)


class GPT(nnx.Module):
    """GPT-2 language model. `model(tokens, mask) -> (logits, hidden)`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        config = _static(config)
        if config.attention not in ATTENTION:
            raise ValueError(f"attention must be {'|'.join(ATTENTION)}, got {config.attention!r}")
        self.config = config
        C = config.n_embd
        self.wte = nnx.Embed(config.vocab_size, C, embedding_init=_normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(config.block_size, C, embedding_init=_normal(0.02), rngs=rngs)
        self.drop = nnx.Dropout(config.dropout)
        self.h = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(C, rngs=rngs)

    @classmethod
    def init(cls, config: ModelConfig, seed: int | jax.Array = 0):
        """Build the model with a jit-compiled initialiser (eager NNX init compiles every
        op separately and takes seconds). `seed` is an int or a PRNG key."""
        return jit_init(cls, config, seed)

    # ---------------------------------------------------------------- forward passes

    def __call__(self, tokens, mask=None, *, segments=None, branches=None, dropout_key=None):
        """tokens: (B, T) int32; mask: (B, T), 1 = real token, 0 = padding (left or right).
        segments: optional (B, T) ids of sequences packed into one row; a token attends
        only to earlier tokens of its own segment, and positions restart per segment.
        branches: optional (B, T) ids that turn each segment into a tree: a shared prefix
        (branch 0) followed by continuations (branches 1, 2, ...) laid end to end. A
        continuation token attends to the prefix and to earlier tokens of its own branch,
        and its positions continue from the prefix's, so every branch is computed as if
        it were prefix + branch alone (K replies to one prompt: the prompt runs once).
        dropout_key: a PRNG key to train with dropout (`config.dropout`); None = none.

        Returns (logits (B, T, V) float32, hidden (B, T, C) float32 after ln_f).
        """
        hidden = self.hidden_states(tokens, mask, segments=segments, branches=branches,
                                    dropout_key=dropout_key)
        return self.unembed(hidden), hidden

    def hidden_states(self, tokens, mask=None, *, segments=None, branches=None,
                      dropout_key=None, at=None):
        """Final hidden states after ln_f, (B, T, C) float32; no unembedding.

        `at`: optional (B, E) int positions; returns their hidden states only, (B, E, C).
        The last block then computes its queries, attention output, MLP and ln_f at those
        positions alone: nothing else of that layer is ever read. A reward read at each
        reply's end token needs one position per reply, which saves most of a layer (a
        fifth of the tiny model's trunk) forward and backward. The result equals the full
        forward's at those positions.
        """
        B, T = tokens.shape
        if mask is None and segments is None and branches is None and at is None:
            # Unpadded rows (pretraining): plain causal attention, `allowed=None`. The library
            # kernels then run their causal mode instead of reading a (B, 1, T, T) mask: 10-15%
            # of a gpt2 pretraining step with cuDNN on an H200 (docs/05 section 9).
            return self._blocks(tokens, jnp.broadcast_to(jnp.arange(T), (B, T)), None, dropout_key)
        mask = jnp.ones((B, T), jnp.int32) if mask is None else mask.astype(jnp.int32)
        causal = jnp.tril(jnp.ones((T, T), bool))
        allowed = causal[None, None] & (mask[:, None, None, :] > 0)  # (B, 1, T, T)
        if segments is not None:  # block-diagonal: packed sequences never see each other
            allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
        if branches is None:
            positions = positions_from_mask(mask, segments)
        else:
            key_branch = branches[:, None, None, :]
            allowed = allowed & ((key_branch == 0) | (key_branch == branches[:, None, :, None]))
            # a token's position is the number of real tokens it sees before itself, which
            # is what it would be in its own prefix + branch sequence
            positions = jnp.maximum(jnp.sum(allowed[:, 0], axis=-1, dtype=jnp.int32) - 1, 0)
        return self._blocks(tokens, positions, allowed, dropout_key, at)

    def _blocks(self, tokens, positions, allowed, dropout_key, at=None):
        embed_key, *block_keys = _split(dropout_key, 1 + len(self.h))
        x = self.embed(tokens, positions, embed_key)
        for i, (block, key) in enumerate(zip(self.h, block_keys)):
            block_at = at if i == len(self.h) - 1 else None
            if self.config.remat:
                x = _block_forward_remat(block, x, allowed, key, block_at)
            else:
                x, _ = block(x, allowed, dropout_key=key, at=block_at)
        return self.ln_f(x)

    def embed(self, tokens, positions, dropout_key=None):
        """wte[tokens] + wpe[positions], float32 (the residual stream stays float32)."""
        x = self.wte(tokens) + self.wpe(positions)
        return _dropout(self.drop, x, dropout_key)

    def unembed(self, hidden):
        """Tied output layer: logits = hidden · wteᵀ, computed in the compute dtype with
        float32 output (this is `wte.attend` with a float32 result)."""
        dt = _dtype(self.config.dtype)
        return dense(hidden.astype(dt), self.wte.embedding[...].astype(dt).T, jnp.float32)

    def decode(self, tokens, cache: KVCache, mask=None, *, last_only: bool = False):
        """Run a chunk of tokens against the KV cache (a whole prompt, or one new token).

        tokens: (B, T) int32 written at cache slots [cache.index, cache.index + T);
        mask: (B, T), 1 = real token (default all 1). Queries see every earlier real
        token in the cache and the causal part of the chunk; positions continue from
        `cache.length`. Returns (logits (B, T, V) float32, updated cache); with
        `last_only` the logits of the last position only, (B, 1, V) (prefill for
        sampling). Deterministic (no dropout). Logits equal those of the full forward
        over everything cached.
        """
        B, T = tokens.shape
        mask = jnp.ones((B, T), jnp.int32) if mask is None else mask.astype(jnp.int32)
        S = cache.mask.shape[1]
        index = cache.index
        slot_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
        query_slot = index + jnp.arange(T)
        causal = jnp.arange(S)[None, :] <= query_slot[:, None]  # (T, S)
        allowed = causal[None, None] & (slot_mask[:, None, None, :] > 0)  # (B, 1, T, S)
        # the same positions as the full forward over everything cached: clip(cumsum - 1, 0)
        positions = jnp.maximum(cache.length[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
        x = self.embed(tokens, positions)
        ks, vs = [], []
        for i, block in enumerate(self.h):
            x, (k, v) = block(x, allowed, kv=(cache.k[i], cache.v[i]), index=index)
            ks.append(k)
            vs.append(v)
        if last_only:
            x = x[:, -1:]
        logits = self.unembed(self.ln_f(x))
        new_cache = KVCache(
            k=tuple(ks), v=tuple(vs), mask=slot_mask,
            length=cache.length + mask.sum(axis=1), index=index + T,
        )
        return logits, new_cache


class ScalarGPT(nnx.Module):
    """GPT trunk + a scalar head: one float per position (reward model, value model).

    The head is Linear(n_embd, 1) with weights ~ N(0, 1/sqrt(n_embd + 1)) and bias 0, as
    in Stiennon et al. 2020 ("Learning to summarize from human feedback"). The trunk's
    unembedding is never used.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        config = _static(config)
        self.config = config
        self.transformer = GPT(config, rngs=rngs)
        self.head = nnx.Linear(
            config.n_embd, 1, kernel_init=_normal(1.0 / math.sqrt(config.n_embd + 1)), rngs=rngs
        )

    @classmethod
    def init(cls, config: ModelConfig, seed: int | jax.Array = 0):
        """Build with a jit-compiled initialiser (see `GPT.init`)."""
        return jit_init(cls, config, seed)

    @classmethod
    def from_gpt(cls, gpt: GPT, seed: int | jax.Array = 0):
        """A ScalarGPT whose trunk is a copy of `gpt`'s parameters and a fresh head."""
        model = cls.init(gpt.config, seed)
        trunk = jax.tree.map(jnp.copy, nnx.state(gpt))  # own buffers: safe to donate
        nnx.update(model.transformer, trunk)
        return model

    def __call__(self, tokens, mask=None, *, segments=None, branches=None, dropout_key=None,
                 at=None):
        """(B, T) float32: the head applied to every position's final hidden state; with
        `at` (B, E) int, at those positions only, (B, E), computed as cheaply as
        `GPT.hidden_states` can. `segments`, `branches`, `dropout_key`: as in
        `GPT.__call__`."""
        hidden = self.transformer.hidden_states(tokens, mask, segments=segments,
                                                branches=branches, dropout_key=dropout_key,
                                                at=at)
        return self.head(hidden)[..., 0].astype(jnp.float32)


# --------------------------------------------------------------------------- helpers

_INIT_CACHE: dict = {}


def jit_init(cls, config: ModelConfig, seed: int | jax.Array = 0):
    """`cls(config, rngs=nnx.Rngs(seed))`, but built inside one jit-compiled function."""
    config = _static(config)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    cache_key = (cls, config)
    if cache_key not in _INIT_CACHE:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))

        @jax.jit
        def make_state(key):
            return nnx.state(cls(config, rngs=nnx.Rngs(key)))

        _INIT_CACHE[cache_key] = (graphdef, make_state)
    graphdef, make_state = _INIT_CACHE[cache_key]
    return nnx.merge(graphdef, make_state(key))


def count_params(model: nnx.Module) -> int:
    """Number of parameters (the tied embedding counted once)."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


def num_params_formula(config: ModelConfig) -> int:
    """Closed form: V·C + Tmax·C + L·(12C² + 13C) + 2C."""
    V, T, L, C = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·T·C (nanoGPT / PaLM
    appendix B). N excludes the position table (a lookup, no matmul) but includes the
    tied embedding (it is the output layer's matmul)."""
    n = num_params_formula(config) - config.block_size * config.n_embd
    return 6.0 * n + 12.0 * config.n_layer * seq_len * config.n_embd


def logprobs_from_logits(logits, tokens, temperature: float = 1.0):
    """log softmax(logits / temperature) gathered at `tokens`, float32.

    logits (..., V), tokens (...) int -> (...). temperature <= 0 is treated as 1.
    """
    logits = logits.astype(jnp.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot product rather than take_along_axis: the gather's gradient is a scatter,
    # which XLA runs slowly on CPU; this one's is elementwise (tiny train step, 16 x 128 tokens: +24%).
    one_hot = jax.nn.one_hot(tokens, logits.shape[-1], dtype=logits.dtype)
    picked = jnp.sum(logits * one_hot, axis=-1)
    return picked - logz


# --------------------------------------------------------------------------- GPT-2 export

def gpt2_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """Parameters under Hugging Face GPT-2 key names (`transformer.h.0.attn.c_attn.weight`,
    ...). HF's Conv1D stores weights as (in, out), the same as our kernels, so nothing is
    transposed. Save with `safetensors.numpy.save_file(gpt2_state_dict(model), path)`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        leaf = names[-1]
        leaf = {"embedding": "weight", "kernel": "weight", "scale": "weight"}.get(leaf, leaf)
        out["transformer." + ".".join(names[:-1] + [leaf])] = np.asarray(var[...])
    return out
