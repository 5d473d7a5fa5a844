"""Stage 3: PPO against the reward model with a per-token KL penalty to the SFT policy
(Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022 eq. 2; Schulman et al. 2017
PPO-clip; GAE Schulman et al. 2016).

The objective maximised (InstructGPT eq. 2; its ptx term, the plain LM loss on pretraining
text, is added in `make_update_fn` when `ppo.ptx_coef` > 0):

    objective(phi) = E_{(x,y) ~ pi_phi} [ r_theta(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x)) ]

The KL term is spread over the reply's tokens (one -beta * (logp - logp_ref) per token) and the
reward model's score is paid on the reply's last token; PPO-clip with a clipped value loss and
GAE then optimises these per-token rewards.

The stage (below the pure functions) runs the loop of Ziegler et al. / InstructGPT with the
implementation details of Huang et al. 2023 ("N-details #k" in the comments): rollouts from
the jitted KV-cache sampler at the config's temperature; ONE jitted experience pass (policy and
reference logprobs at the same temperature, values from a head on the policy's trunk (PPO's
eq. 9, `ppo.value_model=shared`) or from a value model initialised from the reward model
(`separate`, InstructGPT), the reward model's score on the last real token, KL-shaped
rewards, GAE, whitened advantages); ONE jitted update (`lax.scan` over epochs x shuffled minibatches x
micro-batches, PPO-clip + clipped value loss + optional PPO-ptx, donated buffers); fixed or
adaptive KL coefficient; per-iteration logging with the gold judge; a best-of-n baseline and the
over-optimisation plot of Gao et al. 2022 (gold and RM score against sqrt(KL)); held-out
evaluation against SFT. Entry point: ``run(cfg, run_dir, tok, mesh, policy_stage=...,
reward_stage=..., stage=...)``; the reusable core is ``PPOTrainer``.

Conventions (shared by every function below)
--------------------------------------------
A rollout is ``query`` (the prompt, left-padded, length P) followed by ``response`` (the reply,
length T, right-padded after its end token). All per-token arrays here are (B, T), indexed by
REPLY position t:

* ``logprobs[:, t]`` = log pi(response[:, t] | query, response[:, :t]), i.e. read from the
  logits at full-sequence position P - 1 + t (the position that *predicts* reply token t),
  with logits divided by the sampling temperature. ``ref_logprobs`` and ``old_logprobs`` alike.
* ``values[:, t]`` = V(state before reply token t), read at the same position P - 1 + t.
* ``mask[:, t]`` != 0 for real reply tokens, up to AND INCLUDING the end token; 0 after it
  (padding). Any dtype; only ``mask != 0`` matters. Masked positions may hold garbage (NaN,
  1e9): every function selects with ``jnp.where`` before doing arithmetic, so garbage never
  reaches a result or a gradient, and every output is exactly 0 there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minichat.config import REWARD_SOURCES, check_batch_sizes
from minichat.data import epoch_batch_indices
from minichat.model import ScalarGPT, logprobs_from_logits
from minichat.pretrain import cpu_splits, lm_loss, make_optimizer, sub_batch
from minichat.reward import last_token_index, load_reward_model
from minichat.reward import score as reward_score

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "penalise_unended",
    "shape_rewards",
    "gae",
    "rloo_advantages",
    "ppo_losses",
    "entropy_from_logits",
    "explained_variance",
    "adaptive_kl_update",
    "best_of_n_kl",
    "gao_bon_gold",
    "gao_rl_gold",
]


# ---- losses (pure functions) ----


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask) != 0


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``x`` over the entries where ``mask`` is nonzero (along ``axis``; all if None).

    Masked entries are selected out with ``jnp.where`` (so NaN there is harmless). An empty
    selection gives 0 rather than NaN.
    """
    m = _bool(mask)
    x = jnp.asarray(x)
    total = jnp.where(m, x, 0).sum(axis=axis)
    count = m.sum(axis=axis)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of ``x`` over the unmasked entries (whole array).

    ``unbiased=True`` applies Bessel's correction n / (n - 1) (as trl does);
    ``unbiased=False`` is the population variance (as ``tf.nn.moments`` in lm-human-preferences).
    With n <= 1 the correction is skipped (no division by zero).
    """
    m = _bool(mask)
    x = jnp.asarray(x)
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(jnp.where(m, x - mean, 0)), m)
    if unbiased:
        n = m.sum().astype(var.dtype)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)
    return var


def masked_whiten(
    x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Normalise ``x`` to mean 0, variance 1 over the unmasked entries of the whole batch.

    ``(x - mean) / sqrt(var + eps)`` with the unbiased masked variance; with
    ``shift_mean=False`` the mean is added back (only the scale changes; used for rewards).
    Used for advantages (RLHF notes item 13). Masked positions of the output are 0.
    """
    m = _bool(mask)
    x = jnp.asarray(x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    w = (jnp.where(m, x, mean) - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        w = w + mean
    return jnp.where(m, w, 0)


def reply_ended(response: jax.Array, mask: jax.Array, end_id: int) -> jax.Array:
    """(B,) bool: the reply emitted the end token among its real tokens."""
    return jnp.any((jnp.asarray(response) == end_id) & _bool(mask), axis=1)


def penalise_unended(scores: jax.Array, ended: jax.Array, no_end_penalty: float) -> jax.Array:
    """The score of a reply that never emitted the end token (N-details #10), capped: the
    fixed penalty, or the reward model's own score of the cut-off reply if that is lower.
    A plain replacement would be a floor: where the reward model scores the policy's replies
    below the penalty, never ending pays, and a fast-moving policy learns it (docs 04,
    section 9: at lr 1e-4 the share of replies that ended fell by 9 points)."""
    scores = jnp.asarray(scores)
    return jnp.where(jnp.asarray(ended, dtype=bool), scores, jnp.minimum(scores, no_end_penalty))


def shape_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    kl_coef,
    ended: jax.Array | None = None,
    no_end_penalty: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token rewards of RLHF (Ziegler et al. 2019 section 2.2; Ouyang et al. 2022 eq. 2).

        rewards[b, t] = -kl_coef * (logprobs[b, t] - ref_logprobs[b, t])      (every reply token)
                        + scores[b] * [t == last real token of row b]

    The KL term uses the k1 estimator log(pi/pi_ref) of the sampled token; its sum over the
    reply is an unbiased estimate of KL(pi || pi_ref) for the sequence. The score is read at the
    reply's last real token (``last_token_index(mask)``), the end token for replies that ended.

    If ``ended`` (B,) bool is given, rows that never emitted the end token get the fixed
    ``no_end_penalty`` (Huang et al. 2023, e.g. -1) instead of their score, or their score if
    it is lower (``penalise_unended``); the penalty is then required.

    Args:
      scores: (B,) reward-model scores of the full replies.
      logprobs, ref_logprobs: (B, T) policy / frozen-SFT logprobs of the reply tokens.
      mask: (B, T) real reply tokens.
      kl_coef: beta, Python float or 0-d array (adaptive controller).

    Returns:
      ``(rewards, kl, non_score_reward)``, each (B, T) and exactly 0 at masked positions, with
      ``kl = logprobs - ref_logprobs`` and ``non_score_reward = -kl_coef * kl``.
    """
    m = _bool(mask)
    scores = jnp.asarray(scores)
    if ended is not None:
        if no_end_penalty is None:
            raise ValueError("shape_rewards: `ended` given without `no_end_penalty`")
        scores = penalise_unended(scores, ended, no_end_penalty)
    # jnp.where selects (no 0 * NaN): garbage at masked positions never leaks.
    kl = jnp.where(m, jnp.asarray(logprobs) - jnp.asarray(ref_logprobs), 0)
    non_score_reward = -kl_coef * kl
    T = m.shape[-1]
    is_last = (jnp.arange(T)[None, :] == last_token_index(m)[:, None]) & m
    rewards = non_score_reward + jnp.where(is_last, scores[:, None], 0).astype(kl.dtype)
    return rewards, kl, non_score_reward


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over reply tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    computed right to left with a reverse ``jax.lax.scan`` over time. No bootstrap past the end
    of the reply: V_{t+1} and A_{t+1} are taken as 0 when position t+1 is masked (or t = T-1),
    so the last real token gets ``delta = r - V``. Masked positions are 0 in both outputs.

    Returns:
      ``(advantages, returns)``, (B, T), with ``returns = advantages + values`` (the value
      targets). Not whitened: whiten advantages with ``masked_whiten`` at the call site.
    """
    m = _bool(mask)
    r = jnp.where(m, jnp.asarray(rewards), 0)
    v = jnp.where(m, jnp.asarray(values), 0)
    # V_{t+1} with 0 past the end (v is already 0 at masked positions).
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    deltas = r + gamma * next_v - v

    def step(next_adv, inp):
        delta_t, m_t = inp
        adv = jnp.where(m_t, delta_t + gamma * lam * next_adv, 0)
        return adv, adv

    init = jnp.zeros(r.shape[0], dtype=deltas.dtype)
    _, adv_tb = jax.lax.scan(step, init, (deltas.T, m.T), reverse=True)
    advantages = adv_tb.T
    returns = jnp.where(m, advantages + v, 0)
    return advantages, returns


def rloo_advantages(returns: jax.Array, k: int) -> jax.Array:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 6).

        A_i = R_i - 1/(k-1) * sum_{j != i} R_j        over the k replies to the same prompt

    ``returns`` (B,) holds each reply's whole KL-shaped return (score - beta * sum_t kl_t);
    rows come in groups of ``k`` consecutive replies to one prompt (B a multiple of k >= 2).
    The baseline is the mean of the *other* replies, so it does not depend on reply i and the
    estimator stays unbiased; it removes what the prompt alone decides (some families score
    +0.9 whatever the policy does, others -0.5), the variance a value model has to learn.
    Equivalently A_i = k/(k-1) * (R_i - mean of the group)."""
    R = jnp.asarray(returns)
    B = R.shape[0]
    if k < 2 or B % k:
        raise ValueError(f"rloo_advantages: batch {B} must be a multiple of samples_per_prompt={k} >= 2")
    g = R.reshape(B // k, k)
    return ((g - g.mean(axis=1, keepdims=True)) * (k / (k - 1))).reshape(B)


def ppo_losses(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_ratio: float = 0.2,
    clip_value: float = 0.2,
    vf_coef: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO-clip policy loss (Schulman et al. 2017, eq. 7) plus the clipped value loss of
    OpenAI baselines' ppo2 / lm-human-preferences (not in the paper, which has eq. 9's plain
    squared error).

        ratio   = exp(logprobs - old_logprobs)
        pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
        v_clip  = clip(values, old_values - eps_v, old_values + eps_v)
        vf_loss = 0.5 * masked_mean(max((values - R)^2, (v_clip - R)^2))
        loss    = pg_loss + vf_coef * vf_loss

    ``old_logprobs``, ``old_values``, ``advantages`` and ``returns`` are rollout constants: a
    ``stop_gradient`` is applied to them here. Advantages are used as given (whiten them first).
    All means are over unmasked tokens of the whole minibatch (token-level mean).

    Stats (scalars, masked):
      * ``pg_loss``, ``vf_loss``, ``loss``;
      * ``clipfrac``: share of tokens where the clipped surrogate term is the active one
        (``pg_losses2 > pg_losses1``, as lm-human-preferences); ``vf_clipfrac`` likewise;
      * ``approx_kl``: 0.5 * mean((logprobs - old_logprobs)^2), the k2 estimator of
        KL(old || new) used by lm-human-preferences;
      * ``approx_kl_k3``: mean((ratio - 1) - log ratio), Schulman's k3 estimator (>= 0,
        unbiased for KL(old || new) under the old policy's samples; cleanRL's ``approx_kl``);
      * ``ratio_mean``, ``ratio_var`` (population variance).
    """
    m = _bool(mask)
    sg = jax.lax.stop_gradient
    lp = jnp.where(m, logprobs, 0)
    old_lp = sg(jnp.where(m, old_logprobs, 0))
    adv = sg(jnp.where(m, advantages, 0))
    v = jnp.where(m, values, 0)
    old_v = sg(jnp.where(m, old_values, 0))
    ret = sg(jnp.where(m, returns, 0))

    log_ratio = lp - old_lp
    ratio = jnp.exp(log_ratio)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    pg_loss = masked_mean(jnp.maximum(pg_losses1, pg_losses2), m)

    v_clipped = jnp.clip(v, old_v - clip_value, old_v + clip_value)
    vf_losses1 = jnp.square(v - ret)
    vf_losses2 = jnp.square(v_clipped - ret)
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf_losses1, vf_losses2), m)

    loss = pg_loss + vf_coef * vf_loss
    stats = {
        "loss": loss,
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "clipfrac": masked_mean((pg_losses2 > pg_losses1).astype(ratio.dtype), m),
        "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).astype(ratio.dtype), m),
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), m),
        "approx_kl_k3": masked_mean((ratio - 1.0) - log_ratio, m),
        "ratio_mean": masked_mean(ratio, m),
        "ratio_var": masked_var(ratio, m, unbiased=False),
    }
    stats = {k: sg(s) for k, s in stats.items()}
    return loss, stats


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) at each position, H = -sum_v p_v log p_v, (...,)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean over tokens of the policy entropy. ``logits`` (B, T, V) are the
    (temperature-scaled) logits predicting each reply token."""
    m = _bool(mask)
    return masked_mean(token_entropy(jnp.where(m[..., None], jnp.asarray(logits), 0)), m)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over unmasked tokens (value-function diagnostic).

    1 = perfect value predictions, 0 = no better than a constant, < 0 = worse. NaN when the
    returns have zero variance (as cleanRL).
    """
    m = _bool(mask)
    v = jnp.where(m, values, 0)
    r = jnp.where(m, returns, 0)
    var_r = masked_var(r, m, unbiased=False)
    var_res = masked_var(r - v, m, unbiased=False)
    return jnp.where(var_r == 0, jnp.nan, 1.0 - var_res / jnp.where(var_r == 0, 1.0, var_r))


def adaptive_kl_update(kl_coef, kl, *, target: float, horizon: float, n_steps):
    """Adaptive KL controller (Ziegler et al. 2019, section 2.2):

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    ``kl`` is the current mean KL(pi || pi_ref) per *sequence* (sum over reply tokens of the
    k1 estimate, averaged over the rollout batch); ``n_steps`` is the number of episodes
    (replies) in that rollout batch, as in lm-human-preferences. Ziegler et al. used
    target 6 nats, horizon 10k. A fixed coefficient needs no controller: the caller simply
    does not call this (``kl_coef`` stays constant).
    """
    e = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + e * n_steps / horizon)


def best_of_n_kl(n):
    """The analytic KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020
    appendix; Gao et al. 2022). 0 at n = 1, increasing in n. Exact when the base policy never
    samples the same reply twice; otherwise an upper bound (Beirami et al. 2024), loose for
    a nearly deterministic policy, whose best-of-n is closer to it than plotted."""
    n = jnp.asarray(n, dtype=jnp.result_type(float))
    return jnp.log(n) - (n - 1.0) / n


def gao_bon_gold(d, a, b):
    """Gao et al. 2022 functional form of the best-of-n gold reward against d = sqrt(KL):
    R(d) = d (a - b d)."""
    d = jnp.asarray(d)
    return d * (a - b * d)


def gao_rl_gold(d, a, b):
    """Gao et al. 2022 functional form of the RL gold reward against d = sqrt(KL):
    R(d) = d (a - b log d).

    R(0) = 0 (the limit of d log d), without the NaN of 0 * log 0.
    """
    d = jnp.asarray(d)
    pos = d > 0
    safe_d = jnp.where(pos, d, 1.0)
    return jnp.where(pos, safe_d * (a - b * jnp.log(safe_d)), 0.0)


# ---- the PPO stage (rollouts, scoring, the jitted update, the loop) ----
#
# One iteration (Ziegler et al. 2019 section 2.2; Huang et al. 2023 "N implementation details",
# "N-details #k" below):
#   1. rollout     sample a reply per prompt (ppo.samples_per_prompt, for RLOO) from the policy
#                  with the jitted KV-cache sampler (temperature T, no top-k / top-p: N-details
#                  #3, #4);
#   2. experience  ONE jitted function: policy and reference logprobs (logits / T, the SAME T
#                  as sampling: N-details #4), values, the reward model's score, shaped
#                  per-token rewards, GAE, whitened advantages;
#   3. update      ONE jitted function: `lax.scan` over epochs x minibatches (a fresh
#                  permutation per epoch), each minibatch a `lax.scan` of micro-batch gradient
#                  accumulation (on a CPU each micro-batch as parallel.cpu_splits concurrent
#                  sub-batches); PPO-clip + clipped value loss (+ PPO-ptx), AdamW on the
#                  policy and on the value model; buffers donated;
#   4. adaptive KL (optional), log, checkpoint.



class Rollout(NamedTuple):
    """What the update needs, all (B, ...) with B = rollout batch size (PPO constants)."""

    query: jax.Array  # (B, P) int32, left-padded prompt
    query_mask: jax.Array  # (B, P) int32
    response: jax.Array  # (B, N) int32, pad after <|end|>
    mask: jax.Array  # (B, N) int32, 1 up to and including <|end|>
    logprobs: jax.Array  # (B, N) old policy logprobs (recomputed, logits / T)
    values: jax.Array  # (B, N) old values
    advantages: jax.Array  # (B, N) whitened
    returns: jax.Array  # (B, N) value targets


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """The static (hashable) hyperparameters the jitted functions close over: the PPOConfig
    fields of the same names (no defaults here, so there is one source of truth)."""

    temperature: float
    gamma: float
    lam: float
    clip_ratio: float
    clip_value: float
    vf_coef: float
    whiten_rewards: bool
    no_end_penalty: float
    ptx_coef: float
    epochs: int
    minibatch_size: int
    micro_batch_size: int
    samples_per_prompt: int
    advantage: str
    value_model: str
    end_id: int
    splits: int  # concurrent sub-batches per micro-batch (parallel.cpu_splits on a CPU)

    @classmethod
    def from_config(cls, pcfg, end_id: int, splits: int = 1) -> "PPOHyper":
        """The PPOConfig fields of the same names, typed as declared here."""
        cast = {"float": float, "int": int, "bool": bool, "str": str}
        values = {f.name: cast[str(f.type)](getattr(pcfg, f.name))
                  for f in dataclasses.fields(cls) if f.name not in ("end_id", "splits")}
        return cls(**values, end_id=int(end_id), splits=int(splits))


def reply_positions(tokens, prompt_len: int):
    """The full-sequence positions P-1 .. P+N-2 whose outputs predict / value the N reply
    tokens, (B, N) int32: the only outputs PPO reads. Passed as the model's `at`, the
    prompt's other positions skip the last block's queries, MLP and the unembedding."""
    B, T = tokens.shape
    return jnp.broadcast_to(jnp.arange(prompt_len - 1, T - 1, dtype=jnp.int32), (B, T - prompt_len))


def reply_logits(model, tokens, mask, prompt_len: int, temperature: float):
    """Temperature-scaled logits predicting each reply token: positions P-1 .. P+N-2 of the
    full sequence (the module's index convention), (B, N, V) float32."""
    # no dropout key: N-details #5, no dropout
    hidden = model.hidden_states(tokens, mask, at=reply_positions(tokens, prompt_len))
    return _tempered_logits(model, hidden, temperature)


def _tempered_logits(model, hidden, temperature: float):
    logits = model.unembed(hidden)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature  # N-details #4: the sampling temperature, again
    return logits


def reply_values(value_model, tokens, mask, prompt_len: int):
    """V(state before reply token t), read at full-sequence position P-1+t -> (B, N)."""
    return value_model(tokens, mask, at=reply_positions(tokens, prompt_len))  # no dropout, as the policy


def value_head(n_embd: int) -> nnx.Linear:
    """`ppo.value_model=shared`: the value head on the policy's trunk, zero-initialised. A new
    head that starts at 0 sends no gradient into the trunk until it has learnt something, so
    the first updates are the policy's alone, and its first values are 0."""
    return nnx.Linear(n_embd, 1, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))


def policy_outputs(policy, value, tokens, mask, prompt_len: int, hp: "PPOHyper"):
    """(temperature-scaled logits (B, N, V), values (B, N) or None) at the reply positions.

    `value` is the value model (`ppo.value_model=separate`: its own trunk, run on its own),
    the head on the policy's final hidden states (`shared`: one trunk pass gives both), or
    unused (RLOO: None is returned)."""
    # no dropout key: N-details #5, no dropout
    hidden = policy.hidden_states(tokens, mask, at=reply_positions(tokens, prompt_len))
    logits = _tempered_logits(policy, hidden, hp.temperature)
    if hp.advantage != "gae":
        return logits, None
    if hp.value_model == "shared":
        return logits, value(hidden)[..., 0].astype(jnp.float32)
    return logits, reply_values(value, tokens, mask, prompt_len)


def _micro_map(fn, micro: int, splits: int, *arrays):
    """`fn` applied to consecutive chunks of `micro` rows (`lax.map`), outputs re-concatenated;
    within a chunk, to its `splits` strided sub-batches side by side (independent work, which
    XLA:CPU runs concurrently).

    The experience pass computes the old logprobs on exactly the sub-batch shapes that the
    update uses, so XLA runs the same kernels on the same shapes and the first update's ratio
    is 1 to the last bit (RLHF notes item 5)."""
    def chunk_fn(*xs):
        if splits == 1:
            return fn(*xs)
        outs = [fn(*(sub_batch(x, i, splits) for x in xs)) for i in range(splits)]
        return jax.tree.map(lambda *ys: jnp.stack(ys, 1).reshape(-1, *ys[0].shape[1:]), *outs)

    B = arrays[0].shape[0]
    if B <= micro:
        return chunk_fn(*arrays)
    chunks = [a.reshape(B // micro, micro, *a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda xs: chunk_fn(*xs), tuple(chunks))
    return jax.tree.map(lambda y: y.reshape(B, *y.shape[2:]), out)


def make_experience_fn(policy_graphdef, value_graphdef, reward_fn: Callable, hp: PPOHyper,
                       policy_rest=None, value_rest=None):
    """Jitted `experience(policy, ref, value, reward_params, kl_coef, query, query_mask,
    response, mask, sampler_logprobs) -> (Rollout, per-row dict, scalar stats)`.

    `reward_fn(reward_params, tokens, mask) -> (B,)` scores full sequences
    [left-padded prompt | right-padded reply]; for the reward model it is
    `minichat.reward.score` (the head at `last_token_index(mask)`, + the normalisation bias).
    """
    prest = () if policy_rest is None else (policy_rest,)
    vrest = () if value_rest is None else (value_rest,)

    def experience(policy, ref, value, reward_params, kl_coef, query, query_mask, response, mask,
                   sampler_logprobs):
        P = query.shape[1]
        m = mask != 0
        tokens = jnp.concatenate([query, response], axis=1)
        full_mask = jnp.concatenate([query_mask, mask], axis=1).astype(jnp.int32)

        def forward(tokens, full_mask, response):
            pol = nnx.merge(policy_graphdef, policy, *prest)
            refm = nnx.merge(policy_graphdef, ref, *prest)
            val = nnx.merge(value_graphdef, value, *vrest)
            logits, v = policy_outputs(pol, val, tokens, full_mask, P, hp)
            lp = logprobs_from_logits(logits, response)
            ent = token_entropy(logits)
            ref_lp = logprobs_from_logits(reply_logits(refm, tokens, full_mask, P, hp.temperature),
                                          response)
            # RLOO's baseline is the other replies to the prompt: no value model to run.
            return lp, ent, ref_lp, jnp.zeros_like(lp) if v is None else v

        lp, ent, ref_lp, values = _micro_map(forward, hp.micro_batch_size, hp.splits, tokens, full_mask, response)
        # N-details #11: nothing past the end token counts: zero it, mask it everywhere.
        lp, ref_lp, values = (jnp.where(m, x, 0.0) for x in (lp, ref_lp, values))
        scores = reward_fn(reward_params, tokens, full_mask).astype(jnp.float32)
        ended = reply_ended(response, m, hp.end_id)
        # N-details #10: a reply that never ended gets the penalty (or its score, if lower).
        penalised = penalise_unended(scores, ended, hp.no_end_penalty)
        # N-details #9: that score on the last real token, -beta * (logp - logp_ref) on every
        # reply token.
        rewards, kl, non_score = shape_rewards(penalised, lp, ref_lp, m, kl_coef)
        if hp.whiten_rewards:  # optional, off by default (N+ details)
            rewards = masked_whiten(rewards, m, shift_mean=False)
        if hp.advantage == "rloo":
            # One advantage per reply, on every one of its tokens; the value model is unused
            # (returns = values: a zero value loss).
            adv = rloo_advantages(jnp.where(m, rewards, 0.0).sum(1), hp.samples_per_prompt)
            advantages, returns = jnp.where(m, adv[:, None], 0.0), values  # values: zeros
        else:
            advantages, returns = gae(rewards, values, m, hp.gamma, hp.lam)  # N-details #12
        advantages = masked_whiten(advantages, m)  # N-details #13: over the masked batch
        rollout = Rollout(query, query_mask, response, mask.astype(jnp.int32), lp, values,
                          advantages, returns)
        rows = {"scores": scores, "ended": ended, "length": m.sum(1), "kl": kl.sum(1),
                "response": response, "mask": mask, "rewards": rewards, "kl_tokens": kl}
        stats = {
            "objective/scores": scores.mean(),
            "objective/scores_penalised": penalised.mean(),
            "objective/kl": kl.sum(1).mean(),  # per sequence, k1 estimator
            "objective/kl_token": masked_mean(kl, m),
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": (penalised + non_score.sum(1)).mean(),
            "objective/entropy": masked_mean(ent, m),
            "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
            "debug/sampler_logprob_gap": masked_mean(jnp.abs(sampler_logprobs - lp), m),
        }
        if hp.advantage == "gae":
            stats.update({"val/mean": masked_mean(values, m), "val/returns_mean": masked_mean(returns, m),
                          "val/explained_variance": explained_variance(values, returns, m)})
        return rollout, rows, stats

    return jax.jit(experience)


def make_update_fn(policy_graphdef, value_graphdef, policy_tx, value_tx, hp: PPOHyper,
                   policy_rest=None, value_rest=None):
    """Jitted `update(policy, value, policy_opt, value_opt, rollout, key, ptx) ->
    (policy, value, policy_opt, value_opt, stats)`, the WHOLE PPO update of one iteration.

    `lax.scan` over `epochs` (a fresh permutation of the rollouts from `key` each epoch), inside
    it a `lax.scan` over the B / minibatch_size minibatches, inside that a `lax.scan` over the
    minibatch_size / micro_batch_size micro-batches accumulating gradients, each weighted by
    its share of the minibatch's reply tokens, so that the gradient is the token mean over the
    whole minibatch whatever the micro-batch size (and `hp.splits` sub-batches of each, side by
    side: `grad_fn`). One optimizer step per minibatch for each model. The parameter and
    optimizer buffers are donated. `stats` holds every minibatch's `ppo_losses` stats,
    shape (epochs, n_minibatches): `stats[...][0, 0]` is the first step (ratio exactly 1).
    `ptx` (PPO-ptx) is None or pretraining tokens (epochs, n_mb, n_micro, b, L + 1).
    """

    prest = () if policy_rest is None else (policy_rest,)
    vrest = () if value_rest is None else (value_rest,)
    mb_size, micro = hp.minibatch_size, hp.micro_batch_size
    n_micro = mb_size // micro

    def loss_fn(policy, value, batch: Rollout, ptx_tokens, token_weight, ptx_weight):
        P = batch.query.shape[1]
        tokens = jnp.concatenate([batch.query, batch.response], axis=1)
        full_mask = jnp.concatenate([batch.query_mask, batch.mask], axis=1)
        pol = nnx.merge(policy_graphdef, policy, *prest)
        val = nnx.merge(value_graphdef, value, *vrest)
        # shared: the value loss's gradient reaches the policy's trunk too (PPO eq. 9's one
        # network); separate: it reaches only the value model
        logits, v = policy_outputs(pol, val, tokens, full_mask, P, hp)
        lp = logprobs_from_logits(logits, batch.response)
        v = batch.values if v is None else v
        loss, stats = ppo_losses(lp, batch.logprobs, batch.advantages, v, batch.values,
                                 batch.returns, batch.mask, clip_ratio=hp.clip_ratio,
                                 clip_value=hp.clip_value, vf_coef=hp.vf_coef)
        stats["entropy"] = jax.lax.stop_gradient(entropy_from_logits(logits, batch.mask))
        # ppo_losses' means are over this micro-batch's tokens: weighting each by its share
        # of the minibatch's tokens makes the summed gradient the minibatch's token mean (a
        # plain average of micro-batch means would weigh a token of a short micro-batch more)
        loss, stats = loss * token_weight, {k: s * token_weight for k, s in stats.items()}
        if ptx_tokens is not None:
            # PPO-ptx (InstructGPT eq. 2): + gamma * E_pretrain[log pi(x)], i.e. + gamma * LM loss.
            ptx_logits, _ = pol(ptx_tokens[:, :-1])
            ptx_loss = lm_loss(ptx_logits, ptx_tokens[:, 1:],
                               jnp.ones_like(ptx_tokens[:, 1:])) * ptx_weight
            loss = loss + hp.ptx_coef * ptx_loss
            stats["ptx_loss"] = jax.lax.stop_gradient(ptx_loss)
            stats["loss"] = jax.lax.stop_gradient(loss)
        return loss, stats

    value_and_grad = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    splits = hp.splits

    def grad_fn(policy, value, batch: Rollout, ptx_tokens, token_weight):
        """One micro-batch's (loss, stats), grads: as `splits` strided sub-batches in one
        program, each weighted by its share of the micro-batch's reply tokens. They share no
        work, so XLA:CPU runs them concurrently where one tiny model's chain of small matmuls
        leaves cores idle (as pretraining's `split_value_and_grad`)."""
        if splits == 1:
            return value_and_grad(policy, value, batch, ptx_tokens, token_weight, 1.0 / n_micro)
        parts = [jax.tree.map(lambda x: sub_batch(x, i, splits), batch) for i in range(splits)]
        counts = jnp.stack([(b.mask != 0).sum() for b in parts]).astype(jnp.float32)
        shares = counts / jnp.maximum(counts.sum(), 1.0)
        # PPO-ptx rows split the same way; if they do not divide evenly, every part takes the
        # mean over all of them (the same term, computed `splits` times)
        even = ptx_tokens is not None and ptx_tokens.shape[0] % splits == 0
        ptx_parts = [sub_batch(ptx_tokens, i, splits) if even else ptx_tokens for i in range(splits)]
        outs = [value_and_grad(policy, value, b, ptx, token_weight * share, 1.0 / (n_micro * splits))
                for b, ptx, share in zip(parts, ptx_parts, shares)]
        return jax.tree.map(lambda *xs: sum(xs), *outs)

    def update(policy, value, policy_opt, value_opt, rollout: Rollout, key, ptx):
        B = rollout.query.shape[0]
        n_mb = B // mb_size

        def minibatch_step(carry, xs):
            policy, value, policy_opt, value_opt = carry
            idx, ptx_mb = xs  # idx: (n_micro, micro) rollout rows of this minibatch
            if n_micro == 1:
                take = jax.tree.map(lambda x: x[idx[0]], rollout)
                (_, stats), (g_pol, g_val) = grad_fn(policy, value, take,
                                                     None if ptx_mb is None else ptx_mb[0], 1.0)
            else:
                n_tokens = (rollout.mask[idx] != 0).sum(axis=(1, 2))  # (n_micro,)
                weights = n_tokens / jnp.maximum(n_tokens.sum(), 1)

                def micro_step(acc, xs):
                    midx, ptx_micro, weight = xs
                    take = jax.tree.map(lambda x: x[midx], rollout)
                    (_, stats), grads = grad_fn(policy, value, take, ptx_micro, weight)
                    return jax.tree.map(jnp.add, acc, (grads, stats)), None

                zeros = jax.tree.map(jnp.zeros_like, (policy, value))
                _, stats0 = jax.eval_shape(grad_fn, policy, value,
                                           jax.tree.map(lambda x: x[idx[0]], rollout),
                                           None if ptx_mb is None else ptx_mb[0], 1.0)[0]
                acc0 = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats0))
                ((g_pol, g_val), stats), _ = jax.lax.scan(micro_step, acc0,
                                                          (idx, ptx_mb, weights))
            upd, policy_opt = policy_tx.update(g_pol, policy_opt, policy)
            policy = optax.apply_updates(policy, upd)
            if hp.advantage == "gae":  # (RLOO: no value model, its gradient is 0)
                upd, value_opt = value_tx.update(g_val, value_opt, value)
                value = optax.apply_updates(value, upd)
            stats["policy_grad_norm"] = optax.tree.norm(g_pol)
            stats["value_grad_norm"] = optax.tree.norm(g_val)
            return (policy, value, policy_opt, value_opt), stats

        def epoch(carry, xs):
            ekey, ptx_epoch = xs
            perm = jax.random.permutation(ekey, B)  # shuffled minibatches, new every epoch
            idx = perm.reshape(n_mb, n_micro, micro)
            return jax.lax.scan(minibatch_step, carry, (idx, ptx_epoch))

        keys = jax.random.split(key, hp.epochs)
        carry, stats = jax.lax.scan(epoch, (policy, value, policy_opt, value_opt), (keys, ptx))
        return (*carry, stats)

    return jax.jit(update, donate_argnums=(0, 1, 2, 3))



# ---- prompts -------------------------------------------------------------------------------


def prompt_pool(cfg) -> list[dict]:
    """Rollout prompts: the user's prompt JSONL (`cfg.ppo.files`, no gold judge) or ChatWorld
    train-split prompts (with `family` / `meta`, so the gold judge scores every rollout).
    Drawn with their own seed: fresh combinations of train-split entities, asked in the
    phrasings `cfg.ppo.phrasings` (by default "rl": wordings SFT never had a demonstration of)."""
    if cfg.ppo.files:
        from minichat.data import load_prompts
        return load_prompts(list(cfg.ppo.files))
    from minichat.world import world_from_config, generate_dialogues, to_prompt
    dialogues = generate_dialogues(world_from_config(cfg.world), cfg.ppo.n_prompts, "train",
                                   seed=cfg.world.seed + 11, phrasing_split=cfg.ppo.phrasings)
    return [to_prompt(d) for d in dialogues]


def encode_prompts(tok, examples, width: int):
    """All prompts left-padded to ONE width (nothing recompiles between iterations); a prompt
    longer than `width` keeps its last tokens."""
    from minichat.evaluate import prompt_batch
    return prompt_batch(tok, examples, width)


def prompts_within(tok, examples, width: int) -> list[dict]:
    """The examples whose rendered prompt fits in `width` tokens."""
    return [ex for ex in examples if len(tok.render_prompt(ex["messages"])) <= width]


def choose_prompt_width(tok, examples, pcfg, block_size: int) -> tuple[int, list[int]]:
    """One prompt width for the run and the prompts that fit in it.

    `ppo.prompt_width = 0` picks the smallest multiple of 16 that holds 95% of the prompts:
    every rollout pays for the width (attention and MLPs run over the padding too), and the
    longest few prompts would otherwise make every batch much wider (ChatWorld: median 26
    tokens, longest ~100). Longer prompts are left out of the pool (not truncated: a truncated
    conversation is a different conversation). Returns (width, indices of the kept prompts).
    """
    lengths = np.array([len(tok.render_prompt(ex["messages"])) for ex in examples])
    limit = block_size - pcfg.max_new_tokens
    if pcfg.prompt_width > 0:
        width = pcfg.prompt_width
    else:
        width = int(-(-np.percentile(lengths, 95) // 16) * 16)
    width = min(width, limit)
    if width < 2:
        raise ValueError(f"model.block_size={block_size} leaves no room for prompts with "
                         f"ppo.max_new_tokens={pcfg.max_new_tokens}")
    keep = [i for i, n in enumerate(lengths) if n <= width]
    return width, keep


def gold_scores(examples, tok, response: np.ndarray, mask: np.ndarray) -> tuple[list[float], list[str]]:
    """Gold-judge score of each reply (ChatWorld prompts only) and the decoded texts."""
    from minichat.world import judge
    texts, scores = [], []
    for ex, ids, m in zip(examples, response, mask):
        ids = ids[m > 0]
        ended = bool(len(ids) and ids[-1] == tok.end_id)
        text = tok.decode(ids).strip()
        texts.append(text)
        if "meta" in ex:
            scores.append(judge(ex, text, ended=ended))
    return scores, texts


# ---- models --------------------------------------------------------------------------------


def split_params(model):
    """(graphdef, float parameters, the rest or None): optimizers see nnx.Param only."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, (rest if jax.tree.leaves(rest) else None)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)  # own buffers: safe to donate


# ---- the trainer -----------------------------------------------------------------------------


class PPOTrainer:
    """Policy, frozen reference, value model, frozen reward, two optimizers, the KL coefficient,
    and the three jitted functions. `step(query, query_mask, key)` runs one PPO iteration.

    `reward_fn(reward_params, tokens, mask) -> (B,)` is pure and jit-usable (see
    `make_experience_fn`); the reward and reference models get no optimizer state.
    """

    def __init__(self, policy, ref, value, reward_params, reward_fn: Callable, pcfg, *, end_id: int,
                 pad_id: int, total_iterations: int, mesh=None, peak_flops: float = 0.0,
                 splits: int = 1):

        check_batch_sizes(pcfg.batch_size, pcfg.minibatch_size, pcfg.micro_batch_size,
                          pcfg.samples_per_prompt, pcfg.advantage)
        if isinstance(value, ScalarGPT) != (pcfg.value_model == "separate"):
            raise ValueError(f"ppo.value_model={pcfg.value_model!r} needs "
                             + ("a ScalarGPT value model (its own trunk)" if pcfg.value_model == "separate"
                                else "a value head on the policy's hidden states (minichat.ppo.value_head)")
                             + f", not a {type(value).__name__}")
        self.pcfg, self.end_id, self.pad_id, self.mesh = pcfg, int(end_id), int(pad_id), mesh
        # sub-batches only where each keeps whole rows on every device
        n_dev = 1 if mesh is None else mesh.devices.size
        splits = splits if pcfg.micro_batch_size % (splits * n_dev) == 0 else 1
        self.hp = PPOHyper.from_config(pcfg, end_id, splits)
        self.model_config, self.peak_flops = policy.config, float(peak_flops)  # for MFU
        put = (lambda t: t) if mesh is None else (lambda t: _shard(t, mesh))
        self.graphdef, policy_params, self.rest = split_params(policy)
        _, ref_params, _ = split_params(ref)
        self.value_graphdef, value_params, self.value_rest = split_params(value)
        # Own buffers for everything: the update donates the policy/value buffers, and the
        # reference must not alias the policy it started equal to.
        self.policy, self.value = put(_copy(policy_params)), put(_copy(value_params))
        self.ref = put(_copy(ref_params))
        self.reward_params = put(reward_params)
        n_updates = total_iterations * pcfg.epochs * (pcfg.batch_size // pcfg.minibatch_size)
        self.policy_tx, self.schedule = make_optimizer(pcfg.optim, max(n_updates, 1))
        value_optim = (dataclasses.replace(pcfg.optim, lr=pcfg.value_head_lr)
                       if pcfg.value_model == "shared" else pcfg.optim)
        self.value_tx, _ = make_optimizer(value_optim, max(n_updates, 1))
        self.policy_opt = put(jax.jit(self.policy_tx.init)(self.policy))
        self.value_opt = put(jax.jit(self.value_tx.init)(self.value))
        self.kl_coef = float(pcfg.kl_coef)
        self.prompt_width: int | None = None  # set by `run` (one width for the whole run)
        self.experience = make_experience_fn(self.graphdef, self.value_graphdef, reward_fn, self.hp,
                                             self.rest, self.value_rest)
        self.update = make_update_fn(self.graphdef, self.value_graphdef, self.policy_tx, self.value_tx,
                                     self.hp, self.rest, self.value_rest)

    # -- the three phases --
    def generate(self, query, query_mask, key):
        from minichat.sampling import generate
        # N-details #3/#4: temperature from config, top-k / top-p off, stop at <|end|>.
        return generate((self.graphdef, self._merge_state(self.policy, self.rest)), query, query_mask,
                        key, max_new_tokens=self.pcfg.max_new_tokens, temperature=self.pcfg.temperature,
                        top_k=0, top_p=1.0, end_id=self.end_id, pad_id=self.pad_id)

    @staticmethod
    def _merge_state(params, rest):
        return params if rest is None else nnx.merge_state(params, rest)

    def score(self, query, query_mask, gen):
        return self.experience(self.policy, self.ref, self.value, self.reward_params,
                               jnp.float32(self.kl_coef), query, query_mask, gen.tokens, gen.mask,
                               gen.logprobs)

    def train(self, rollout: Rollout, key, ptx=None):
        (self.policy, self.value, self.policy_opt, self.value_opt,
         stats) = self.update(self.policy, self.value, self.policy_opt, self.value_opt, rollout, key, ptx)
        return stats

    def step(self, query, query_mask, key, ptx=None):
        """One iteration. Returns (rollout, per-row arrays (numpy), stats row, raw update stats)."""
        k_gen, k_upd = jax.random.split(key)
        query, query_mask = self._put_batch(query), self._put_batch(query_mask)
        t0 = time.perf_counter()
        gen = jax.block_until_ready(self.generate(query, query_mask, k_gen))
        t1 = time.perf_counter()
        rollout, rows, stats = jax.block_until_ready(self.score(query, query_mask, gen))
        t2 = time.perf_counter()
        upd = jax.block_until_ready(self.train(rollout, k_upd, ptx))
        t3 = time.perf_counter()
        from minichat.parallel import gather, to_host
        row = {k: to_host(v) for k, v in stats.items()}
        row.update(update_stats_row(upd))
        rows = {k: gather(v) for k, v in rows.items()}
        row["length"] = float(np.mean(rows["length"]))
        row["ended"] = float(np.mean(rows["ended"]))
        row.update({"time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2})
        row.update(self.mfu(query.shape[0], query.shape[1], gen.tokens.shape[1], t1 - t0, t2 - t1, t3 - t2,
                            ptx))
        # Ziegler et al.'s adaptive controller, on the rollout's KL (before this update).
        if self.pcfg.adaptive_kl:
            self.kl_coef = float(adaptive_kl_update(self.kl_coef, row["objective/kl"],
                                                    target=self.pcfg.kl_target,
                                                    horizon=self.pcfg.kl_horizon,
                                                    n_steps=self.pcfg.batch_size))
        return rollout, rows, row, upd

    def mfu(self, B: int, P: int, N: int, t_gen: float, t_score: float, t_update: float, ptx=None) -> dict:
        """Model FLOPs utilisation of one iteration, overall and per phase, from the model's
        FLOPs on sequences of T = P + N tokens (forward = a third of `flops_per_token`'s
        forward + backward; the scalar models have no vocabulary projection):
        generation = B·T policy forwards (prefill + one decode per token, full cache);
        scoring = policy, reference, value and reward forwards; update = epochs x forward +
        backward of the policy and the value model (+ the PPO-ptx sequences). A value head on
        the policy's trunk (`value_model=shared`) or none (RLOO) adds no trunk to either."""
        from minichat.model import flops_per_token
        from minichat.parallel import device_peak_flops, mesh_size, mfu
        c, T = self.model_config, P + N
        lm = flops_per_token(c, T)
        scalar = lm - 6.0 * c.vocab_size * c.n_embd
        n_value = int(self.hp.advantage == "gae" and self.hp.value_model == "separate")
        gen, score = B * T * lm / 3, B * T * (2 * lm + (1 + n_value) * scalar) / 3
        update = self.hp.epochs * B * T * (lm + n_value * scalar)
        if ptx is not None:
            L = ptx.shape[-1] - 1
            update += int(np.prod(ptx.shape[:-1])) * L * flops_per_token(c, L)
        peak, n = device_peak_flops(self.peak_flops), mesh_size(self.mesh)
        f = lambda flops, t: mfu(flops / max(t, 1e-9), 1.0, n, peak)
        total_t = t_gen + t_score + t_update
        return {"mfu": f(gen + score + update, total_t), "mfu/generation": f(gen, t_gen),
                "mfu/scoring": f(score, t_score), "mfu/update": f(update, t_update),
                "tokens_per_s": B * N / max(total_t, 1e-9)}

    def _put_batch(self, x):
        """Rows split over the mesh's batch axes (data-parallel rollouts and updates), each
        process feeding its own rows; replicated when the batch does not divide the mesh."""
        if self.mesh is None:
            return jnp.asarray(x, jnp.int32)
        from minichat.parallel import batch_divisor, shard_batch
        x = np.asarray(x, np.int32)
        if x.shape[0] % batch_divisor(self.mesh):
            return jnp.asarray(x)
        return shard_batch({"x": x}, self.mesh)["x"]

    def policy_model(self):
        return nnx.merge(self.graphdef, self.policy, *(() if self.rest is None else (self.rest,)))

    def ref_model(self):
        return nnx.merge(self.graphdef, self.ref, *(() if self.rest is None else (self.rest,)))


def update_stats_row(upd: dict) -> dict:
    """Means over all epochs x minibatches of the update's stats, plus the first step's."""
    names = {"pg_loss": "ppo/policy_loss", "vf_loss": "ppo/value_loss", "loss": "ppo/loss",
             "clipfrac": "ppo/clipfrac", "vf_clipfrac": "ppo/value_clipfrac", "approx_kl": "ppo/approxkl",
             "approx_kl_k3": "ppo/approxkl_k3", "ratio_mean": "ppo/ratio_mean", "ratio_var": "ppo/ratio_var",
             "entropy": "ppo/entropy", "ptx_loss": "ppo/ptx_loss", "policy_grad_norm": "ppo/policy_grad_norm",
             "value_grad_norm": "ppo/value_grad_norm"}
    row = {}
    from minichat.parallel import gather
    upd = {k: gather(v) for k, v in upd.items()}
    for k, v in upd.items():
        row[names.get(k, "ppo/" + k)] = float(v.mean())
    row["ppo/approxkl_first"] = float(np.asarray(upd["approx_kl"])[0, 0])
    row["ppo/ratio_first"] = float(np.asarray(upd["ratio_mean"])[0, 0])
    return row


def _shard(tree, mesh):
    from minichat.parallel import shard_state
    return shard_state(tree, mesh)


# ---- best-of-n baseline (Gao et al. 2022) --------------------------------------------------


def best_of_n_baseline(trainer: PPOTrainer, tok, examples, query, query_mask, ns, key,
                       score_fn) -> list[dict]:
    """Sample max(ns) replies per prompt from the REFERENCE (SFT) policy, keep the reward
    model's best of n; KL(best-of-n || SFT) <= log n - (n - 1)/n (`best_of_n_kl`).

    Every n that divides max(ns) is estimated from all max(ns) // n disjoint groups of the same
    samples (a lower-variance estimate than one group). Returns one row per n: n, kl, sqrt_kl,
    gold (mean gold score of the chosen replies) and rm (their mean penalised RM score).
    """
    from minichat.parallel import gather
    from minichat.sampling import generate
    n_max, B = max(ns), trainer.pcfg.batch_size
    K = len(examples)
    rep_q = np.repeat(query, n_max, axis=0)  # prompt-major: row k * n_max + j
    rep_m = np.repeat(query_mask, n_max, axis=0)
    rows_needed = len(rep_q)
    pad = (-rows_needed) % B
    rep_q = np.concatenate([rep_q, rep_q[:pad]]) if pad else rep_q
    rep_m = np.concatenate([rep_m, rep_m[:pad]]) if pad else rep_m
    ref_state = PPOTrainer._merge_state(trainer.ref, trainer.rest)
    rm, gold, responses, masks = [], [], [], []
    for i in range(0, len(rep_q), B):
        q, qm = trainer._put_batch(rep_q[i:i + B]), trainer._put_batch(rep_m[i:i + B])
        gen = generate((trainer.graphdef, ref_state), q, qm, jax.random.fold_in(key, i),
                       max_new_tokens=trainer.pcfg.max_new_tokens, temperature=trainer.pcfg.temperature,
                       top_k=0, top_p=1.0, end_id=trainer.end_id, pad_id=trainer.pad_id)
        rm.append(gather(score_fn(trainer.reward_params, q, qm, gen.tokens, gen.mask)))
        responses.append(gather(gen.tokens))
        masks.append(gather(gen.mask))
    rm = np.concatenate(rm)[:rows_needed].reshape(K, n_max)
    responses = np.concatenate(responses)[:rows_needed]
    masks = np.concatenate(masks)[:rows_needed]
    rep_examples = [ex for ex in examples for _ in range(n_max)]
    gold, _ = gold_scores(rep_examples, tok, responses, masks)
    return best_of_n_table(rm, np.asarray(gold).reshape(K, n_max), ns)


def best_of_n_table(rm: np.ndarray, gold: np.ndarray, ns) -> list[dict]:
    """Best-of-n from (K prompts, n_max samples) reward-model and gold scores: for every n
    that divides n_max, each prompt's samples in consecutive groups of n, the reward
    model's choice in each group; the mean RM and gold score of the chosen replies."""
    K, n_max = rm.shape
    out = []
    for n in sorted(set(ns)):
        if n_max % n:
            continue
        g_rm = rm.reshape(K, n_max // n, n)
        g_gold = gold.reshape(K, n_max // n, n)
        best = g_rm.argmax(-1)[..., None]
        kl = float(best_of_n_kl(n))
        out.append({"n": int(n), "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)),
                    "rm": float(np.take_along_axis(g_rm, best, -1).mean()),
                    "gold": float(np.take_along_axis(g_gold, best, -1).mean())})
    return out


def gold_reward_fn(pool: list[dict], pool_q: np.ndarray, tok) -> Callable:
    """A `reward_fn(params, tokens, mask) -> (B,)` that is ChatWorld's gold judge: each row's
    prompt (its left-padded ids, exactly as `encode_prompts` wrote them) is looked up among
    `pool`'s, its reply decoded and judged on the host (`jax.pure_callback`, so it runs inside the
    jitted experience pass). With it PPO optimises the true objective: what is left between
    PPO and best-of-n is the optimiser's doing, not the reward model's (docs 04, section 9)."""
    width = pool_q.shape[1]
    row_of = {}
    for i, q in enumerate(np.asarray(pool_q, np.int32)):
        row_of.setdefault(q.tobytes(), i)

    def judge_rows(tokens, mask):
        tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask)
        missing = [i for i, row in enumerate(tokens) if row[:width].tobytes() not in row_of]
        if missing:
            raise KeyError(f"gold reward: row {missing[0]}'s prompt is not among the {len(pool)} it knows")
        examples = [pool[row_of[row[:width].tobytes()]] for row in tokens]
        scores, _ = gold_scores(examples, tok, tokens[:, width:], mask[:, width:])
        return np.asarray(scores, np.float32)

    def reward_fn(params, tokens, mask):
        del params
        out = jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32)
        return jax.pure_callback(judge_rows, out, tokens, mask)

    return reward_fn


def make_score_fn(reward_fn: Callable, no_end_penalty: float, end_id: int):
    """Jitted (reward_params, query, query_mask, response, mask) -> penalised score (B,)."""
    @jax.jit
    def score(reward_params, query, query_mask, response, mask):
        tokens = jnp.concatenate([query, response], axis=1)
        full_mask = jnp.concatenate([query_mask, mask], axis=1).astype(jnp.int32)
        s = reward_fn(reward_params, tokens, full_mask).astype(jnp.float32)
        ended = reply_ended(response, mask, end_id)
        return penalise_unended(s, ended, no_end_penalty)
    return score


# ---- plots and report ----------------------------------------------------------------------


def plot_ppo_curves(rows: list[dict], path: str) -> None:
    """The per-iteration PPO curves, one panel per group of logged statistics."""
    from minichat.evaluate import plt  # Agg backend
    panels = [
        ("scores", ["gold", "objective/scores_penalised"]),
        ("KL to the reference (nats / reply)", ["objective/kl"]),
        ("entropy (nats / token)", ["objective/entropy"]),
        ("policy update", ["ppo/clipfrac", "ppo/approxkl"]),
        ("value model", ["ppo/value_loss", "val/explained_variance"]),
        ("replies", ["length"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None
                   and np.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=key)
        handles, labels = ax.get_legend_handles_labels()
        if title == "replies":
            ax.set_ylabel("tokens")
            ax2 = ax.twinx()
            pts = [(r["step"], r["ended"]) for r in rows if "ended" in r]
            if pts:
                ax2.plot(*zip(*pts), color="tab:red", label="ended")
                ax2.set_ylim(0, 1.05)
                ax2.set_ylabel("share ended with <|end|>")
                h2, l2 = ax2.get_legend_handles_labels()
                handles, labels = handles + h2, labels + l2
        if title == "value model":  # explained variance starts very negative (a value model copied from the RM)
            ax.set_ylim(bottom=max(ax.get_ylim()[0], -1.0), top=max(ax.get_ylim()[1], 1.0))
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overoptimization(rows: list[dict], bon: list[dict], path: str, smooth: int = 5) -> None:
    """Gold and reward-model score against sqrt(KL(pi || SFT)) for PPO (one point per iteration,
    a moving average as the line) and for best-of-n sampling from SFT (Gao et al. 2022 fig. 1)."""
    from minichat.evaluate import plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    d = np.sqrt(np.maximum([r["objective/kl"] for r in rows], 0.0)) if rows else np.zeros(0)
    for ax, key, bkey, title in ((axes[0], "gold", "gold", "gold judge"),
                                 (axes[1], "objective/scores_penalised", "rm", "reward model")):
        if rows and all(key in r for r in rows):
            y = np.asarray([r[key] for r in rows])
            ax.scatter(d, y, s=10, alpha=0.35, color="tab:blue")
            k = max(1, min(smooth, len(y)))
            ys = np.convolve(y, np.ones(k) / k, mode="valid")
            ds = np.convolve(d, np.ones(k) / k, mode="valid")
            ax.plot(ds, ys, color="tab:blue", label=f"PPO (moving average of {k})")
        if bon:
            ax.plot([b["sqrt_kl"] for b in bon], [b[bkey] for b in bon], "o--", color="tab:orange",
                    label="best-of-n from SFT")
            for b in bon:
                ax.annotate(f"n={b['n']}", (b["sqrt_kl"], b[bkey]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("sqrt(KL(policy || SFT))  [sqrt nats]")
        ax.set_ylabel(f"{title} score")
        ax.set_title(f"{title} score vs sqrt(KL)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over paired prompts with a normal-approximation 95% interval."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean = float(diff.mean())
    half = float(1.96 * diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(len(diff))}


# ---- the stage -----------------------------------------------------------------------------


def run(cfg, run_dir: str, tok, mesh, *, policy_stage: str = "sft", reward_stage: str = "reward",
        stage: str = "ppo", ref_stage: str = "sft") -> dict:
    """Stage 3: PPO from `policy_stage`'s policy against `reward_stage`'s reward model, with a
    KL penalty to the frozen `ref_stage` (SFT) policy. Writes `<run_dir>/<stage>/`:
    checkpoints/ (policy params + optimizer; `restore_params(run_dir, stage, ...)` loads it),
    value_checkpoints/ (value model + optimizer), metrics.jsonl, ppo_curves.png,
    overoptimization.png, bon.json and DONE.json (held-out SFT vs PPO gold evaluation and
    `report_md`). Resumes from the newest checkpoint present for both models."""
    from minichat.checkpoint import (Checkpointer, MetricsLog, mark_done, restore_newest_readable,
                                     restore_params, stage_dir, write_json)
    from minichat.model import GPT

    t_start = time.perf_counter()
    pcfg = cfg.ppo
    sdir = stage_dir(run_dir, stage)
    if pcfg.reward_source not in REWARD_SOURCES:
        raise ValueError(f"ppo.reward_source={pcfg.reward_source!r}: expected "
                         f"{' or '.join(map(repr, REWARD_SOURCES))}")
    from minichat.parallel import require_divisible
    # micro | minibatch | batch: every update and rollout batch then splits over the mesh
    require_divisible("ppo.micro_batch_size", pcfg.micro_batch_size, mesh)

    # -- models: policy from `policy_stage`, frozen reference = SFT, value head or model --
    policy = restore_params(run_dir, policy_stage, GPT.init(cfg.model, cfg.seed), cfg.model)
    ref = policy if ref_stage == policy_stage else restore_params(
        run_dir, ref_stage, GPT.init(cfg.model, cfg.seed), cfg.model)
    reward_model, bias = load_reward_model(run_dir, cfg, stage=reward_stage)
    rm_graphdef, rm_state = nnx.split(reward_model)
    if pcfg.value_model == "shared":  # a new head on the policy's trunk (PPO eq. 9)
        value = value_head(cfg.model.n_embd)
    else:  # N-details #15: the value model starts as a copy of the reward model (own trunk).
        value = nnx.merge(rm_graphdef, _copy(rm_state))
    reward_params = (rm_state, jnp.float32(bias))

    def model_reward_fn(params, tokens, mask):
        return reward_score(nnx.merge(rm_graphdef, params[0]), tokens, mask, params[1])

    # -- prompts: one fixed width for the whole run (one compile) --
    pool = prompt_pool(cfg)
    has_gold = all("meta" in ex for ex in pool)
    width, keep = choose_prompt_width(tok, pool, pcfg, cfg.model.block_size)
    if len(keep) < len(pool):
        print(f"[ppo] {len(pool) - len(keep)} of {len(pool)} prompts are longer than the prompt width "
              f"{width} and are left out (ppo.prompt_width sets it)")
        pool = [pool[i] for i in keep]
    pool_q, pool_m = encode_prompts(tok, pool, width)
    reward_fn = model_reward_fn
    if pcfg.reward_source == "gold":
        if not has_gold:
            raise ValueError("ppo.reward_source=gold needs ChatWorld prompts (the gold judge knows "
                             "their truth); the prompt files of ppo.files have none")
        from minichat.sft import heldout_prompts
        # the held-out prompts too: `heldout_kl` runs them through the experience pass
        heldout = prompts_within(tok, heldout_prompts(cfg), width)
        reward_fn = gold_reward_fn(pool + heldout,
                                   np.concatenate([pool_q, encode_prompts(tok, heldout, width)[0]]), tok)
        print("[ppo] reward: the GOLD JUDGE itself (ppo.reward_source=gold, a diagnostic: what PPO "
              "does with a perfect reward model)")

    trainer = PPOTrainer(policy, ref, value, reward_params, reward_fn, pcfg, end_id=tok.end_id,
                         pad_id=tok.pad_id, total_iterations=pcfg.iterations, mesh=mesh,
                         peak_flops=cfg.parallel.peak_flops, splits=cpu_splits(cfg, mesh))
    del policy, ref, value

    trainer.prompt_width = width
    B, per_prompt = pcfg.batch_size, pcfg.samples_per_prompt
    if len(pool) < B // per_prompt:
        raise ValueError(f"{len(pool)} PPO prompts but ppo.batch_size={B} needs {B // per_prompt}")
    replies = (f" ({per_prompt} replies to each of {B // per_prompt} prompts, {pcfg.advantage.upper()})"
               if per_prompt > 1 else "")
    print(f"[ppo] {len(pool):,} prompts (width {width}), {pcfg.iterations} iterations of {B} rollouts"
          f"{replies}, {pcfg.epochs} epochs x {B // pcfg.minibatch_size} minibatches")

    # -- best-of-n baseline from the SFT policy (once; cached for resumes) --
    score_fn = make_score_fn(reward_fn, pcfg.no_end_penalty, tok.end_id)
    bon_path = os.path.join(sdir, "bon.json")
    bon: list[dict] = []
    if has_gold and pcfg.best_of_n:
        from minichat.parallel import barrier
        have_bon = os.path.exists(bon_path)
        barrier(f"{stage}/bon")  # multi-host: every process decides alike before process 0 writes
        if have_bon:
            bon = MetricsLog.read(bon_path)[0]["rows"]
        else:
            t = time.perf_counter()
            k = min(pcfg.best_of_n_prompts, len(pool))
            idx = np.random.default_rng([cfg.seed, 1]).permutation(len(pool))[:k]
            bon = best_of_n_baseline(trainer, tok, [pool[i] for i in idx], pool_q[idx], pool_m[idx],
                                     list(pcfg.best_of_n), jax.random.key(cfg.seed + 5), score_fn)
            if jax.process_index() == 0:
                with open(bon_path, "w") as f:
                    f.write(json.dumps({"rows": bon}) + "\n")
            print(f"[ppo] best-of-n baseline in {time.perf_counter() - t:.0f}s: " +
                  ", ".join(f"n={b['n']} gold {b['gold']:+.3f} rm {b['rm']:+.3f}" for b in bon))

    # -- PPO-ptx data (InstructGPT): pretraining sequences mixed into every micro-batch --
    ptx_stream = None
    if pcfg.ptx_coef > 0:
        from minichat.pretrain import corpus_documents, split_streams
        ptx_stream = split_streams(corpus_documents(cfg), tok)[0]
    n_mb, n_micro = B // pcfg.minibatch_size, pcfg.minibatch_size // pcfg.micro_batch_size

    def ptx_batch(it):
        if ptx_stream is None:
            return None
        from minichat.data import lm_batch
        n = pcfg.epochs * n_mb * n_micro
        rows = [lm_batch(ptx_stream, it * n + j, pcfg.ptx_batch_size, pcfg.ptx_seq_len, cfg.seed + 5)
                for j in range(n)]
        return jnp.asarray(np.stack(rows).reshape(pcfg.epochs, n_mb, n_micro, pcfg.ptx_batch_size, -1))

    # -- resume --
    ckpt = Checkpointer(os.path.join(sdir, "checkpoints"), keep=pcfg.keep)
    vckpt = Checkpointer(os.path.join(sdir, "value_checkpoints"), keep=pcfg.keep)
    start = 0

    def restore(step):
        policy, policy_opt, meta = ckpt.restore(step, trainer.policy, trainer.policy_opt, model_cfg=cfg.model)
        value, value_opt, _ = vckpt.restore(step, trainer.value, trainer.value_opt)
        return policy, policy_opt, value, value_opt, meta

    restored = restore_newest_readable({"policy": ckpt, "value": vckpt}, restore, stage) if cfg.resume else None
    if restored is not None:
        trainer.policy, trainer.policy_opt, trainer.value, trainer.value_opt, meta = restored
        trainer.kl_coef, start = float(meta["kl_coef"]), int(meta["step"])
        print(f"[ppo] resuming from iteration {start} (kl_coef {trainer.kl_coef:.4g})")
    log = MetricsLog(os.path.join(sdir, "metrics.jsonl"), resume_step=start if start else None)
    base_key = jax.random.key(cfg.seed + 3)

    def save(it):
        meta = {"step": it, "kl_coef": trainer.kl_coef, "model": dataclasses.asdict(cfg.model),
                "stage": stage, "seed": cfg.seed,
                "rng": np.asarray(jax.random.key_data(jax.random.fold_in(base_key, it))).tolist()}
        ckpt.save(it, trainer.policy, trainer.policy_opt, meta)
        if jax.process_count() > 1:  # Orbax's multi-host commit barrier is named by the step:
            ckpt.wait()  # let the policy's finish before the value model's (same step) starts
        vckpt.save(it, trainer.value, trainer.value_opt, {"step": it, "stage": stage})

    # -- the loop --
    from tqdm.auto import tqdm
    bar = tqdm(range(start, pcfg.iterations), initial=start, total=pcfg.iterations, desc=stage,
               disable=not (cfg.progress and jax.process_index() == 0), dynamic_ncols=True)
    for it in bar:
        idx = np.repeat(epoch_batch_indices(len(pool), it, B // per_prompt, cfg.seed), per_prompt)
        t0 = time.perf_counter()
        _, rows, row, _ = trainer.step(pool_q[idx], pool_m[idx], jax.random.fold_in(base_key, it),
                                       ptx_batch(it))
        # the schedule counts optimizer updates: the last one of this iteration
        last_update = (it + 1) * pcfg.epochs * (B // pcfg.minibatch_size) - 1
        out = {"step": it + 1, "episodes": (it + 1) * B, "lr": float(trainer.schedule(last_update))}
        if has_gold:
            # The gold judge sees the rollouts the RM scored (the over-optimisation plot's y).
            gold, _ = gold_scores([pool[i] for i in idx], tok, rows["response"], rows["mask"])
            out["gold"] = float(np.mean(gold))
        out.update(row)
        out["time/iteration"] = time.perf_counter() - t0
        if not math.isfinite(out["ppo/loss"]):
            raise FloatingPointError(f"[{stage}] PPO loss became {out['ppo/loss']} at iteration {it + 1}; "
                                     f"lower ppo.optim.lr")
        log.log(out)
        gold = {"gold": f"{out['gold']:+.3f}"} if "gold" in out else {}  # ChatWorld prompts only
        bar.set_postfix(**gold, rm=f"{out['objective/scores']:+.3f}", kl=f"{out['objective/kl']:.2f}")
        if not cfg.progress and ((it + 1) % 5 == 0 or it == start):
            print(f"[{stage}] it {it + 1}/{pcfg.iterations} " + "".join(f"gold {g} " for g in gold.values()) +
                  f"rm {out['objective/scores']:+.3f} kl {out['objective/kl']:.3f} "
                  f"len {out['length']:.1f} ended {out['ended']:.2f} ({out['time/iteration']:.1f}s)")
        if (it + 1) % pcfg.checkpoint_every == 0 or it + 1 == pcfg.iterations:
            save(it + 1)
    bar.close()
    ckpt.close()
    vckpt.close()
    t_train = time.perf_counter() - t_start

    # -- plots, evaluation, summary --
    rows_all = log.rows
    main = jax.process_index() == 0  # multi-host: process 0 writes the plots and summary
    if main:
        plot_ppo_curves(rows_all, os.path.join(sdir, "ppo_curves.png"))
    if has_gold and main:
        plot_overoptimization(rows_all, bon, os.path.join(sdir, "overoptimization.png"))
    summary = summarise(rows_all, bon, stage, t_train)
    summary.update(policy_stage=policy_stage, reward_stage=reward_stage, ref_stage=ref_stage,
                   reward_source=pcfg.reward_source)
    # The held-out evaluation samples on one host's devices: a multi-host run skips it (as
    # pretraining skips its samples); evaluate the checkpoint in a single process afterwards.
    if has_gold and pcfg.evaluate and jax.process_count() == 1:
        summary.update(evaluate_vs_reference(trainer, tok, cfg, sdir, run_dir, ref_stage))
    summary["seconds"] = time.perf_counter() - t_start
    summary["report_md"] = report_markdown(summary, stage, has_gold)
    if main:
        write_json(os.path.join(sdir, "summary.json"), {k: v for k, v in summary.items() if k != "samples"})
    mark_done(run_dir, stage, summary)
    print(summary["report_md"])
    return summary


def summarise(rows: list[dict], bon: list[dict], stage: str, seconds_train: float) -> dict:
    last = rows[-5:] if rows else []
    mean = lambda k: float(np.mean([r[k] for r in last if k in r])) if any(k in r for r in last) else None
    first = rows[0] if rows else {}
    return {
        "stage": stage, "iterations": len(rows), "seconds_train": seconds_train,
        "final": {k: mean(k) for k in ("gold", "objective/scores", "objective/scores_penalised",
                                        "objective/kl", "objective/kl_coef", "objective/entropy",
                                        "length", "ended", "ppo/clipfrac", "ppo/approxkl",
                                        "val/explained_variance")},
        "initial": {k: first.get(k) for k in ("gold", "objective/scores", "objective/kl", "length",
                                               "ended")},
        "time_per_iteration": {k: mean(k) for k in ("time/generation", "time/scoring", "time/update",
                                                     "time/iteration")},
        "best_of_n": bon,
    }


def evaluate_vs_reference(trainer: PPOTrainer, tok, cfg, sdir: str, run_dir: str,
                          ref_stage: str = "sft") -> dict:
    """Gold-judge evaluation of the PPO policy on the held-out prompts (held-out entities and
    phrasings), greedy and sampled, with the SFT stage's settings; paired with the reference
    (SFT) policy's replies to the SAME prompts (read from `<ref_stage>/eval.jsonl` when it
    matches, else sampled here): the mean difference PPO - SFT and its 95% interval. Writes
    `<stage>/eval.jsonl` (per-prompt records for the report)."""
    from minichat.checkpoint import MetricsLog
    from minichat.evaluate import conversation_text, evaluate_policy, judge_replies, sample_replies, save_eval
    from minichat.sft import heldout_prompts

    prompts = heldout_prompts(cfg)
    kw = dict(max_new_tokens=cfg.sft.max_new_tokens, temperature=cfg.sft.eval_temperature, seed=cfg.seed)
    bar = lambda label: dict(desc=f"{os.path.basename(sdir)} eval, {label}" if cfg.progress else "")
    res = evaluate_policy(trainer.policy_model(), tok, prompts, **kw, **bar("policy"))
    save_eval(os.path.join(sdir, "eval.jsonl"), prompts, res)
    ref_path = os.path.join(run_dir, ref_stage, "eval.jsonl")
    ref_rows = MetricsLog.read(ref_path) if os.path.exists(ref_path) else []
    if [r["messages"] for r in ref_rows] == [p["messages"] for p in prompts]:
        ref_scores = {m: [r[m]["score"] for r in ref_rows] for m in ("greedy", "sampled")}
        ref_text = [r["greedy"]["reply"] for r in ref_rows]
    else:
        ref = evaluate_policy(trainer.ref_model(), tok, prompts, **kw, **bar("reference"))
        ref_scores = {m: ref[m]["scores"] for m in ("greedy", "sampled")}
        ref_text = [r["text"] for r in ref["greedy"]["replies"]]
    out = {"eval": {m: res[m]["table"] for m in ("greedy", "sampled")},
           "gold_vs_sft": {m: paired_difference(res[m]["scores"], ref_scores[m])
                           for m in ("greedy", "sampled")},
           "kl_to_sft": heldout_kl(trainer, tok, prompts)}
    # The same comparison where PPO trained, on prompts of its own rollout pool: a policy
    # that exploits the reward model loses here first, even while it gains on unseen
    # prompts (docs 04, section 9). Sampled only.
    rollout_like = prompt_pool(cfg)[:len(prompts)]
    seen_scores = [judge_replies(rollout_like, sample_replies(m, tok, rollout_like, **kw))[0]
                   for m in (trainer.policy_model(), trainer.ref_model())]
    out["gold_vs_sft_seen"] = paired_difference(*seen_scores)
    samples, seen = [], set()
    for ex, rep, ref_reply in zip(prompts, res["greedy"]["replies"], ref_text):
        if ex["family"] not in seen:
            seen.add(ex["family"])
            samples.append(conversation_text(ex, rep["text"]) + f"\n\n*(SFT: {ref_reply})*")
    out["samples"] = samples
    return out


def heldout_kl(trainer: PPOTrainer, tok, prompts: list[dict], max_batches: int = 4) -> float:
    """KL(policy || SFT) in nats per reply on held-out prompts (k1 estimate on the policy's own
    samples at the rollout temperature), through the same jitted sampler and experience pass."""
    from minichat.parallel import to_host
    B = trainer.pcfg.batch_size
    width = trainer.prompt_width
    prompts = prompts_within(tok, prompts, width)
    prompts = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]  # all families
    kls = []
    for b in range(min(max_batches, len(prompts) // B)):
        q, qm = encode_prompts(tok, prompts[b * B:(b + 1) * B], width)
        q, qm = trainer._put_batch(q), trainer._put_batch(qm)
        gen = trainer.generate(q, qm, jax.random.key(10_000 + b))
        _, _, stats = trainer.score(q, qm, gen)
        kls.append(to_host(stats["objective/kl"]))
    return float(np.mean(kls)) if kls else float("nan")


def report_markdown(summary: dict, stage: str, has_gold: bool) -> str:
    """A markdown snippet for report.md (image paths relative to the run directory)."""
    f, i, t = summary["final"], summary["initial"], summary["time_per_iteration"]
    fmt = lambda x, spec="+.3f": "-" if x is None else format(x, spec)
    lines = [f"## PPO ({stage})", "",
             f"{summary['iterations']} iterations in {summary['seconds_train']:.0f}s "
             f"({fmt(t['time/iteration'], '.2f')}s each: generation {fmt(t['time/generation'], '.2f')}s, "
             f"scoring {fmt(t['time/scoring'], '.2f')}s, update {fmt(t['time/update'], '.2f')}s).", "",
             "| rollouts | first iteration | last 5 iterations |", "|---|---|---|"]
    gold_reward = summary.get("reward_source") == "gold"
    if gold_reward:
        lines[2:2] = ["The reward was the gold judge itself (`ppo.reward_source=gold`, a diagnostic), "
                      "not the reward model: its score below is the gold score.", ""]
    for key, name in (("gold", "gold score"),
                      ("objective/scores", "reward (gold judge)" if gold_reward else "reward-model score"),
                      ("objective/kl", "KL to SFT (nats / reply)"), ("length", "reply length (tokens)"),
                      ("ended", "share ended")):
        if key in f and f[key] is not None:
            lines.append(f"| {name} | {fmt(i.get(key))} | {fmt(f[key])} |")
    lines += ["", f"![PPO curves](plots/{stage}_ppo_curves.png)", ""]
    if has_gold:
        lines += [f"![Over-optimisation](plots/{stage}_overoptimization.png)", "",
                  "Gold and reward-model score against sqrt(KL to SFT): PPO iterations and best-of-n "
                  "from SFT (KL <= log n - (n-1)/n, the analytic bound). Where the reward-model score keeps rising and the "
                  "gold score does not, the policy is exploiting the reward model (Gao et al. 2022).", ""]
    if "gold_vs_sft" in summary:
        for m in ("greedy", "sampled"):
            d = summary["gold_vs_sft"][m]
            lines.append(f"- held-out gold, {stage.upper()} - SFT ({m}): {d['mean']:+.3f} "
                         f"[95% CI {d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], n = {d['n']}")
        if "gold_vs_sft_seen" in summary:
            d = summary["gold_vs_sft_seen"]
            lines.append(f"- gold on prompts of PPO's own rollout pool (its entities and phrasings), "
                         f"{stage.upper()} - SFT (sampled): {d['mean']:+.3f} "
                         f"[95% CI {d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], n = {d['n']}")
        lines.append(f"- KL({stage.upper()} || SFT) on held-out prompts: {summary['kl_to_sft']:.3f} nats "
                     f"per reply")
        lines.append("")
    return "\n".join(lines)
