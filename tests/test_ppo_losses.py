"""Golden tests for the pure functions of stage 3 (PPO with a KL penalty), minichat/ppo.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minichat.ppo import (
    adaptive_kl_update,
    best_of_n_kl,
    entropy_from_logits,
    explained_variance,
    gae,
    gao_bon_gold,
    gao_rl_gold,
    masked_mean,
    masked_var,
    masked_whiten,
    penalise_unended,
    ppo_losses,
    rloo_advantages,
    shape_rewards,
)

B, T = 4, 7  # the one shape used by the randomised tests (one compile per function)
gae_jit = jax.jit(gae)
whiten_jit = jax.jit(masked_whiten, static_argnames="shift_mean")
ppo_jit = jax.jit(ppo_losses)


def right_padded_mask(lengths, T=T):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


# ---------------------------------------------------------------- masked statistics


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_masked_whiten_matches_numpy_on_unmasked(seed, shift_mean):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(B, T)).astype(np.float32)
    mask = rng.random((B, T)) < 0.6
    mask[0, :2] = True  # at least two real entries
    garbage = np.where(mask, x, np.float32(np.nan))
    out = np.asarray(whiten_jit(garbage, mask, shift_mean=shift_mean))
    xs = x[mask].astype(np.float64)
    ref = (xs - xs.mean()) / np.sqrt(xs.var(ddof=1) + 1e-8)
    if not shift_mean:
        ref = ref + xs.mean()
    np.testing.assert_allclose(out[mask], ref, rtol=1e-4, atol=1e-4)
    assert np.all(out[~mask] == 0)
    np.testing.assert_allclose(masked_mean(garbage, mask), xs.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_var(garbage, mask), xs.var(ddof=1), rtol=1e-4)
    np.testing.assert_allclose(masked_var(garbage, mask, unbiased=False), xs.var(), rtol=1e-4)


def test_masked_mean_axis_and_empty():
    x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 6.0]])
    m = jnp.array([[1, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(masked_mean(x, m, axis=1), [1.5, 5.0])
    np.testing.assert_allclose(masked_mean(x, m, axis=0), [2.5, 2.0, 6.0])
    assert float(masked_mean(x, jnp.zeros_like(m))) == 0.0  # empty selection: 0, not NaN
    assert float(masked_var(x, jnp.array([[1, 0, 0], [0, 0, 0]]))) == 0.0


# ---------------------------------------------------------------- reward shaping


def test_shape_rewards_score_at_last_token_kl_zero_at_padding():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 7, 1, 0])  # the last row: an empty reply gets nothing
    mask = right_padded_mask(lengths)
    lp = rng.normal(-2, 1, size=(B, T)).astype(np.float32)
    ref = rng.normal(-2, 1, size=(B, T)).astype(np.float32)
    lp_g = np.where(mask, lp, np.float32(np.nan))  # garbage past the end
    ref_g = np.where(mask, ref, np.float32(1e9))
    scores = np.array([2.0, -3.0, 0.5, 7.0], dtype=np.float32)
    kl_coef = 0.1
    rewards, kl, nsr = jax.jit(shape_rewards)(scores, lp_g, ref_g, mask, kl_coef)
    rewards, kl, nsr = map(np.asarray, (rewards, kl, nsr))
    for a in (rewards, kl, nsr):
        assert np.all(np.isfinite(a))
        assert np.all(a[~mask] == 0)
    np.testing.assert_allclose(kl[mask], (lp - ref)[mask], rtol=1e-6)
    np.testing.assert_allclose(nsr, -kl_coef * kl, rtol=1e-6)
    score_part = rewards - nsr
    expected = np.zeros((B, T), np.float32)
    for b, n in enumerate(lengths):
        if n > 0:
            expected[b, n - 1] = scores[b]  # exactly the reply's last real token
    np.testing.assert_allclose(score_part, expected, atol=1e-6)


def test_shape_rewards_no_end_penalty_only_for_rows_without_end():
    mask = right_padded_mask([2, 7, 4, 7])
    zeros = np.zeros((B, T), np.float32)
    scores = np.array([2.0, 3.0, 4.0, 5.0], np.float32)
    ended = np.array([True, False, True, False])
    rewards, _, _ = shape_rewards(
        scores, zeros, zeros, mask, 0.05, ended=ended, no_end_penalty=-1.0
    )
    np.testing.assert_allclose(np.asarray(rewards).sum(1), [2.0, -1.0, 4.0, -1.0])
    assert float(rewards[1, 6]) == -1.0 and float(rewards[0, 1]) == 2.0
    with pytest.raises(ValueError):
        shape_rewards(scores, zeros, zeros, mask, 0.05, ended=ended)


@settings(deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.floats(-10, 10, width=32, allow_subnormal=False), st.booleans()),
                min_size=1, max_size=8),
       st.floats(-5, 0, width=32, allow_subnormal=False))  # XLA:CPU flushes subnormals to 0
def test_not_ending_never_pays(rows, penalty):
    """An unended reply scores min(its own score, the penalty): never more than it would
    have scored, never more than the penalty; ended replies keep their score exactly."""
    scores = np.array([s for s, _ in rows], np.float32)
    ended = np.array([e for _, e in rows])
    out = np.asarray(penalise_unended(scores, ended, penalty))
    np.testing.assert_array_equal(out[ended], scores[ended])
    assert np.all(out[~ended] <= scores[~ended]) and np.all(out[~ended] <= np.float32(penalty))
    np.testing.assert_array_equal(out[~ended], np.minimum(scores[~ended], np.float32(penalty)))


# ---------------------------------------------------------------- GAE


def gae_reference(rewards, values, lengths, gamma, lam):
    """Explicit sums, float64: A_t = sum_l (gamma lam)^l delta_{t+l}, V_L = 0 past the end."""
    Bn, Tn = rewards.shape
    adv = np.zeros((Bn, Tn))
    for b in range(Bn):
        L = int(lengths[b])
        v = list(values[b, :L]) + [0.0]  # no bootstrap past the last real token
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            adv[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(L - t))
    returns = np.where(right_padded_mask(lengths, Tn), adv + values, 0.0)
    return adv, returns


@settings(deadline=None, max_examples=30)
@given(
    st.lists(st.integers(0, T), min_size=B, max_size=B),
    st.floats(0.5, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_scan_gae_equals_python_loop_float64(lengths, gamma, lam, seed):
    rng = np.random.default_rng(seed)
    mask = right_padded_mask(lengths)
    rewards = rng.normal(size=(B, T))
    values = rng.normal(size=(B, T))
    ref_adv, ref_ret = gae_reference(rewards, values, lengths, gamma, lam)
    with jax.enable_x64(True):
        adv, ret = gae_jit(
            np.where(mask, rewards, np.nan),  # garbage past the end must not matter
            np.where(mask, values, 1e9),
            mask,
            np.float64(gamma),
            np.float64(lam),
        )
        assert adv.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)


def test_gae_hand_example():
    # gamma = 1, lam = 0.5, one reply of 3 tokens, reward 1 on the last token.
    # delta = [0 + 0.2 - 0.1, 0 + 0.3 - 0.2, 1 + 0 - 0.3] = [0.1, 0.1, 0.7]
    # A_2 = 0.7; A_1 = 0.1 + 0.5 * 0.7 = 0.45; A_0 = 0.1 + 0.5 * 0.45 = 0.325
    adv, ret = gae(
        jnp.array([[0.0, 0.0, 1.0, 0.0]]),
        jnp.array([[0.1, 0.2, 0.3, 5.0]]),
        jnp.array([[1, 1, 1, 0]]),
        gamma=1.0,
        lam=0.5,
    )
    np.testing.assert_allclose(adv, [[0.325, 0.45, 0.7, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.425, 0.65, 1.0, 0.0]], rtol=1e-6)


@settings(deadline=None, max_examples=30)
@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_rloo_advantage_is_return_minus_the_mean_of_the_other_replies(k, groups, seed):
    rng = np.random.default_rng(seed)
    R = rng.normal(size=groups * k)
    ref = np.empty_like(R)
    for i in range(len(R)):  # brute force: the other k - 1 replies to the same prompt
        g = i // k
        others = [R[j] for j in range(g * k, (g + 1) * k) if j != i]
        ref[i] = R[i] - sum(others) / (k - 1)
    with jax.enable_x64(True):
        adv = np.asarray(rloo_advantages(R, k))
        np.testing.assert_allclose(adv, ref, rtol=1e-12, atol=1e-12)
        # what the prompt alone decides cancels: a constant per group changes nothing
        shift = np.repeat(rng.normal(size=groups) * 10, k)
        np.testing.assert_allclose(np.asarray(rloo_advantages(R + shift, k)), ref, atol=1e-9)
    np.testing.assert_allclose(adv.reshape(groups, k).sum(1), 0, atol=1e-9)


def test_rloo_needs_whole_groups_of_at_least_two():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        rloo_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        rloo_advantages(jnp.zeros(6), 1)


# ---------------------------------------------------------------- PPO losses


@settings(deadline=None, max_examples=20)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, T), min_size=B, max_size=B))
def test_ppo_step_zero_ratio_one(seed, lengths):
    """At the first update of a rollout, new == old: ratio 1, approx-KL 0, no clipping."""
    rng = np.random.default_rng(seed)
    mask = right_padded_mask(lengths)
    lp = rng.normal(-2, 1, size=(B, T)).astype(np.float32)
    v = rng.normal(size=(B, T)).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    ret = rng.normal(size=(B, T)).astype(np.float32)
    loss, s = ppo_jit(lp, lp, adv, v, v, ret, mask)
    assert float(s["ratio_mean"]) == 1.0 and float(s["ratio_var"]) == 0.0
    assert float(s["approx_kl"]) == 0.0 and float(s["approx_kl_k3"]) == 0.0
    assert float(s["clipfrac"]) == 0.0 and float(s["vf_clipfrac"]) == 0.0
    np.testing.assert_allclose(s["pg_loss"], -adv[mask].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["vf_loss"], 0.5 * ((v - ret)[mask] ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, s["pg_loss"] + 0.1 * s["vf_loss"], rtol=1e-6, atol=1e-7)  # float32 sum of two near-cancelling terms


HAND_RATIOS = np.array([[1.5, 0.5, 1.1, 0.5, 1.0]])  # 5th position is padding
HAND_MASK = np.array([[1, 1, 1, 1, 0]])


def _hand_inputs(garbage):
    old_lp = np.array([[-1.0, -2.0, -0.5, -3.0, 0.0]])
    lp = old_lp + np.log(HAND_RATIOS)
    adv = np.array([[1.0, 1.0, -2.0, -1.0, 0.0]])
    old_v = np.array([[0.0, 0.0, 1.0, 1.0, 0.0]])
    v = np.array([[0.5, 0.1, 1.0, 0.0, 0.0]])
    ret = np.array([[1.0, -1.0, 2.0, 1.0, 0.0]])
    arrays = [lp, old_lp, adv, v, old_v, ret]
    if garbage is not None:
        arrays = [np.where(HAND_MASK == 1, a, garbage) for a in arrays]
    return [a.astype(np.float32) for a in arrays]


def test_ppo_clipped_objective_hand_computation():
    """eps = 0.2, eps_v = 0.2, vf_coef = 0.1; 4 real tokens.

    policy, per token: max(-A r, -A clip(r, 0.8, 1.2))
      r=1.5, A= 1: max(-1.5, -1.2) = -1.2   (clipped branch active)
      r=0.5, A= 1: max(-0.5, -0.8) = -0.5
      r=1.1, A=-2: max( 2.2,  2.2) =  2.2
      r=0.5, A=-1: max( 0.5,  0.8) =  0.8   (clipped branch active)
      pg_loss = (-1.2 - 0.5 + 2.2 + 0.8) / 4 = 0.325, clipfrac = 2/4
    value, per token: max((v-R)^2, (clip(v, v_old-0.2, v_old+0.2)-R)^2)
      v=0.5, v_old=0, R= 1: max(0.25, (0.2-1)^2=0.64) = 0.64   (clipped active)
      v=0.1, v_old=0, R=-1: max(1.21, 1.21)           = 1.21
      v=1.0, v_old=1, R= 2: max(1.0, 1.0)             = 1.0
      v=0.0, v_old=1, R= 1: max(1.0, (0.8-1)^2=0.04)  = 1.0
      vf_loss = 0.5 * 3.85 / 4 = 0.48125, vf_clipfrac = 1/4
    loss = 0.325 + 0.1 * 0.48125 = 0.373125
    approx_kl = 0.5 * mean(log r ^ 2) = 0.5 * (0.164402 + 0.480453 + 0.009084 + 0.480453) / 4
              = 0.141799;  k3 = mean(r - 1 - log r) = (0.094535 + 0.193147 + 0.004690 + 0.193147)/4
              = 0.121380
    """
    loss, s = ppo_losses(*_hand_inputs(None), HAND_MASK)
    assert float(s["pg_loss"]) == pytest.approx(0.325, abs=1e-6)
    assert float(s["clipfrac"]) == pytest.approx(0.5)
    assert float(s["vf_loss"]) == pytest.approx(0.48125, abs=1e-6)
    assert float(s["vf_clipfrac"]) == pytest.approx(0.25)
    assert float(loss) == pytest.approx(0.373125, abs=1e-6)
    assert float(s["approx_kl"]) == pytest.approx(0.141799, abs=1e-5)
    assert float(s["approx_kl_k3"]) == pytest.approx(0.121380, abs=1e-5)
    assert float(s["ratio_mean"]) == pytest.approx(0.9, abs=1e-6)
    assert float(s["ratio_var"]) == pytest.approx(np.var([1.5, 0.5, 1.1, 0.5]), abs=1e-6)


@pytest.mark.parametrize("garbage", [np.nan, 1e9, -np.inf])
def test_ppo_losses_ignore_garbage_at_masked_positions(garbage):
    clean = _hand_inputs(0.0)
    dirty = _hand_inputs(garbage)
    loss_c, s_c = ppo_jit(*clean, HAND_MASK)
    loss_d, s_d = ppo_jit(*dirty, HAND_MASK)
    assert float(loss_d) == pytest.approx(float(loss_c), abs=0)
    for k in s_c:
        assert float(s_d[k]) == float(s_c[k]), k

    def f(lp, v, *rest):
        return ppo_losses(lp, rest[0], rest[1], v, rest[2], rest[3], HAND_MASK)[0]

    grad = jax.jit(jax.grad(f, argnums=(0, 1)))
    gc = grad(clean[0], clean[3], clean[1], clean[2], clean[4], clean[5])
    gd = grad(dirty[0], dirty[3], dirty[1], dirty[2], dirty[4], dirty[5])
    for a, b in zip(gc, gd):
        assert np.all(np.isfinite(b))
        np.testing.assert_array_equal(a, b)
        assert np.all(np.asarray(b)[HAND_MASK == 0] == 0)


# ---------------------------------------------------------------- diagnostics


def test_entropy_from_logits():
    V = 5
    logits = np.zeros((2, 3, V), np.float32)
    logits[1, 0] = [30.0, 0, 0, 0, 0]  # nearly deterministic
    logits[1, 1:] = np.nan  # padding
    mask = np.array([[1, 1, 1], [1, 0, 0]])
    ent = entropy_from_logits(logits, mask)
    # three uniform tokens (log 5) and one ~0-entropy token
    assert float(ent) == pytest.approx(3 * math.log(V) / 4, abs=1e-5)


def test_explained_variance():
    rng = np.random.default_rng(1)
    ret = rng.normal(size=(B, T)).astype(np.float32)
    mask = right_padded_mask([2, 5, 7, 3])
    ret_g = np.where(mask, ret, np.nan)
    assert float(explained_variance(ret_g, ret_g, mask)) == pytest.approx(1.0)
    const = np.full((B, T), ret[mask].mean(), np.float32)
    assert float(explained_variance(const, ret_g, mask)) == pytest.approx(0.0, abs=1e-5)
    noisy = ret + rng.normal(size=(B, T)).astype(np.float32)
    ref = 1 - np.var((ret - noisy)[mask]) / np.var(ret[mask])
    assert float(explained_variance(noisy, ret_g, mask)) == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------- KL controller, over-optimisation


@pytest.mark.parametrize(
    "kl, e",
    [
        (6.0, 0.0),  # at target: unchanged
        (6.6, 0.1),  # above, inside the band
        (5.4, -0.1),  # below, inside the band
        (100.0, 0.2),  # far above: clipped at +0.2
        (0.0, -0.2),  # far below: clipped at -0.2
        (3.0, -0.2),  # KL/target - 1 = -0.5, clipped
    ],
)
def test_adaptive_kl_update_matches_ziegler(kl, e):
    beta, target, horizon, n_steps = 0.15, 6.0, 10_000, 512
    new = adaptive_kl_update(beta, kl, target=target, horizon=horizon, n_steps=n_steps)
    assert float(new) == pytest.approx(beta * (1 + e * n_steps / horizon), rel=1e-6)
    if e > 0:
        assert float(new) > beta
    elif e < 0:
        assert float(new) < beta


def test_adaptive_kl_update_jits():
    f = jax.jit(lambda b, k: adaptive_kl_update(b, k, target=6.0, horizon=10_000, n_steps=64))
    expected = 0.2 * (1 + 0.2 * 64 / 1e4)
    assert float(f(jnp.float32(0.2), jnp.float32(12.0))) == pytest.approx(expected)


def test_best_of_n_kl():
    assert float(best_of_n_kl(1)) == 0.0
    assert float(best_of_n_kl(2)) == pytest.approx(math.log(2) - 0.5, rel=1e-6)
    kls = np.asarray(best_of_n_kl(np.arange(1, 1025)))
    assert np.all(np.diff(kls) > 0)
    assert float(best_of_n_kl(1024)) == pytest.approx(math.log(1024) - 1023 / 1024, rel=1e-6)


def test_gao_functional_forms():
    d = jnp.array([0.0, 1.0, 2.0])
    np.testing.assert_allclose(gao_bon_gold(d, 1.0, 0.25), [0.0, 0.75, 1.0], rtol=1e-6)
    rl = np.asarray(gao_rl_gold(d, 1.0, 0.5))
    assert rl[0] == 0.0 and np.all(np.isfinite(rl))
    np.testing.assert_allclose(rl[1:], [1.0, 2.0 * (1.0 - 0.5 * math.log(2.0))], rtol=1e-6)
    g = jax.grad(lambda x: gao_rl_gold(x, 1.0, 0.5))(jnp.float32(0.0))
    assert np.isfinite(g)
