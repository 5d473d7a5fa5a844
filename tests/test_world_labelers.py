"""Simulated labelers: exact sorting without noise, Bradley-Terry marginals with it."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minichat.world.labelers import (agreement_ceiling, bayes_accuracy, expected_accuracy, rank,
                                    utilities, win_probability)

scores_st = st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=8)


@settings(deadline=None, max_examples=50)
@given(scores_st, st.integers(0, 2**32 - 1))
def test_zero_noise_zero_bias_sorts_by_score_stably(scores, seed):
    order = rank(scores, [1] * len(scores), np.random.default_rng(seed), noise=0.0, length_bias=0.0)
    assert sorted(order) == list(range(len(scores)))
    assert order == sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@settings(deadline=None, max_examples=20)
@given(st.floats(-1, 1), st.floats(-1, 1), st.sampled_from([0.1, 0.3, 1.0]), st.integers(0, 1000))
def test_pairwise_frequency_matches_bradley_terry(s0, s1, noise, seed):
    rng = np.random.default_rng(seed)
    n = 2000
    wins = sum(rank([s0, s1], [5, 5], rng, noise=noise, length_bias=0.0)[0] == 0 for _ in range(n))
    p = win_probability(s0, s1, noise)
    assert p == pytest.approx(1 / (1 + math.exp(-(s0 - s1) / noise)))
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(wins / n - p) <= 4 * sigma + 1e-3


def test_length_bias_raises_win_rate_of_longer_replies():
    rng = np.random.default_rng(0)
    scores, lengths = [0.5, 0.5], [5, 50]  # equally good, the second much longer

    def long_wins(bias):
        return np.mean([rank(scores, lengths, rng, noise=0.3, length_bias=bias)[0] == 1
                        for _ in range(3000)])

    unbiased, biased = long_wins(0.0), long_wins(0.3)
    assert abs(unbiased - 0.5) < 0.05
    assert biased > 0.75
    # a strong enough bias even beats a better but shorter reply, deterministically
    assert rank([1.0, 0.5], [5, 200], rng, noise=0.0, length_bias=1.0) == [1, 0]
    assert utilities([0.0], [0], length_bias=3.0)[0] == 0.0


def test_agreement_ceiling_analytic_matches_simulation():
    sets = [[1.0, 0.2, -0.5, 0.9], [0.0, 0.1, -1.0]]
    analytic = agreement_ceiling(sets, noise=0.5)
    simulated = agreement_ceiling(sets, noise=0.5, rng=np.random.default_rng(1), n_sims=1500)
    assert 0.5 <= analytic <= 1.0
    assert abs(analytic - simulated) < 0.03
    assert agreement_ceiling(sets, noise=0.0) == 1.0
    assert agreement_ceiling(sets, noise=0.05) > agreement_ceiling(sets, noise=0.5) > \
        agreement_ceiling(sets, noise=50.0) > 0.49


def test_expected_accuracy_matches_accuracy_on_simulated_labelings():
    sets = [[1.0, 0.2, -0.5, 0.9], [0.0, 0.1, -1.0], [0.3, 0.3]]
    rewards = [[0.5, 2.0, -1.0, 0.4], [1.0, 1.0, -3.0], [0.0, 1.0]]  # one tie, some wrong orders
    rng = np.random.default_rng(0)
    right = total = 0.0
    for _ in range(3000):
        for scores, r in zip(sets, rewards):
            pos = np.argsort(rank(scores, [1] * len(scores), rng, noise=0.4))  # position of each reply
            for i in range(len(r)):
                for j in range(i + 1, len(r)):
                    above = pos[i] < pos[j]
                    right += 0.5 if r[i] == r[j] else float((r[i] > r[j]) == above)
                    total += 1
    assert expected_accuracy(sets, rewards, noise=0.4) == pytest.approx(right / total, abs=0.01)


@settings(deadline=None, max_examples=40)
@given(st.lists(st.tuples(st.floats(-1, 1), st.floats(-5, 5)), min_size=2, max_size=6),
       st.floats(0.01, 2.0))
def test_bayes_accuracy_bounds_every_scorer_and_the_agreement(pairs, noise):
    scores, rewards = [[s for s, _ in pairs]], [[r for _, r in pairs]]
    best = bayes_accuracy(scores, noise=noise)
    assert best >= expected_accuracy(scores, rewards, noise=noise) - 1e-12
    assert best >= agreement_ceiling(scores, noise=noise) - 1e-12
    assert expected_accuracy(scores, [[-x for x in rewards[0]]], noise=noise) == pytest.approx(
        1 - expected_accuracy(scores, rewards, noise=noise))  # reversing every order


def test_rank_is_deterministic_in_seed():
    a = rank([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], 7, noise=1.0, length_bias=0.1)
    b = rank([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], 7, noise=1.0, length_bias=0.1)
    assert a == b
