"""Simulated labelers: rank K replies the way noisy, length-biased humans might.

InstructGPT/ChatGPT collect comparison data by having trainers rank several model replies
to one prompt. Here a labeler ranks by the gold judge's score plus two settable flaws:

    utility_i = score_i + length_bias * log(1 + length_i) + noise * G_i,   G_i ~ Gumbel(0, 1)

and the ranking is the order of decreasing utility. Sorting Gumbel-perturbed utilities is
exactly sampling a Plackett-Luce ranking with weights exp(mu_i / noise) (the Gumbel-max
trick), where mu_i = score_i + length_bias * log(1 + length_i). Its pairwise marginal is
Bradley-Terry: since the difference of two independent Gumbels is Logistic,

    P(i ranked above j) = sigmoid((mu_i - mu_j) / noise).

``noise`` is the labeler's temperature (0 = a perfect labeler). ``length_bias`` > 0 makes
longer replies win more often regardless of quality, which is how the blog post explains
the policy's learned verbosity; a reward model trained on such rankings, pushed hard by
PPO, reproduces it.
"""

from __future__ import annotations

import numpy as np


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def utilities(scores, lengths, *, length_bias: float) -> np.ndarray:
    """Noise-free utility mu = score + length_bias * log(1 + length)."""
    scores = np.asarray(scores, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.float64)
    return scores + length_bias * np.log1p(lengths)


def rank(scores, lengths, rng, *, noise: float, length_bias: float = 0.0) -> list[int]:
    """Indices of the replies from best to worst, as one simulated labeler orders them.

    ``lengths`` may be in any unit (words, tokens); ``rng`` is a numpy Generator or a seed.
    With ``noise=0`` and ``length_bias=0`` this is a stable sort by gold score (ties keep
    their input order).
    """
    u = utilities(scores, lengths, length_bias=length_bias)
    if noise > 0:
        u = u + noise * _rng(rng).gumbel(size=u.shape)
    return [int(i) for i in np.argsort(-u, kind="stable")]


def win_probability(mu_i: float, mu_j: float, noise: float) -> float:
    """Bradley-Terry P(i ranked above j) = sigmoid((mu_i - mu_j) / noise)."""
    if noise == 0:
        return 1.0 if mu_i > mu_j else 0.0 if mu_i < mu_j else 0.5
    return float(1.0 / (1.0 + np.exp(-(mu_i - mu_j) / noise)))


def _set_lengths(length_sets, k: int, n: int):
    return np.zeros(n) if length_sets is None else length_sets[k]


def _pair_probabilities(score_sets, length_sets, noise: float, length_bias: float):
    """(set k, i, j, P(i ranked above j)) for every pair i < j within each set."""
    for k, scores in enumerate(score_sets):
        mu = utilities(scores, _set_lengths(length_sets, k, len(scores)), length_bias=length_bias)
        for i in range(len(mu)):
            for j in range(i + 1, len(mu)):
                yield k, i, j, win_probability(mu[i], mu[j], noise)


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / max(len(values), 1))


def agreement_ceiling(score_sets, length_sets=None, *, noise: float, length_bias: float = 0.0,
                      rng=None, n_sims: int = 0) -> float:
    """Expected agreement of two independent labelers on the pairs within each set.

    For a pair with win probability p, two labelers agree with probability
    p^2 + (1 - p)^2, the mean over all pairs here. This is InstructGPT's yardstick for
    reward-model accuracy (inter-labeler agreement). It is not a hard upper bound: a model
    that always picks the likelier winner agrees with one labeler with probability
    max(p, 1 - p) >= p^2 + (1 - p)^2 (`bayes_accuracy`).
    The two coincide on ties (p = 1/2) and on clear-cut pairs (p near 0 or 1).
    With ``n_sims > 0`` the same quantity is estimated by simulating pairs of rankings.
    """
    if noise == 0:
        return 1.0  # deterministic labelers always agree (ties break the same way)
    if not n_sims:
        return _mean(p * p + (1 - p) * (1 - p)
                     for *_, p in _pair_probabilities(score_sets, length_sets, noise, length_bias))
    agree, total = 0.0, 0
    gen = _rng(rng if rng is not None else 0)
    for k, scores in enumerate(score_sets):
        lengths = _set_lengths(length_sets, k, len(scores))
        pairs = [(i, j) for i in range(len(scores)) for j in range(i + 1, len(scores))]
        for _ in range(n_sims):
            a = rank(scores, lengths, gen, noise=noise, length_bias=length_bias)
            b = rank(scores, lengths, gen, noise=noise, length_bias=length_bias)
            pa, pb = np.argsort(a), np.argsort(b)  # position of each reply
            agree += sum((pa[i] < pa[j]) == (pb[i] < pb[j]) for i, j in pairs) / n_sims
        total += len(pairs)
    return float(agree / max(total, 1))


def expected_accuracy(score_sets, reward_sets, length_sets=None, *, noise: float,
                      length_bias: float = 0.0) -> float:
    """Expected pairwise accuracy of a scorer's rewards against ONE labeler's ranking.

    Accuracy on one sampled labeling is a noisy estimate (each pair's label is a coin with
    bias p); its expectation over labelings, sum over pairs of p [r_i > r_j] +
    (1 - p) [r_i < r_j] + 1/2 [r_i = r_j], is the same quantity without that noise. With the
    labelers' own noise-free utilities as `reward_sets` it is `bayes_accuracy`."""
    def credit(k, i, j, p):
        d = reward_sets[k][i] - reward_sets[k][j]
        return p if d > 0 else (1 - p) if d < 0 else 0.5

    return _mean(credit(*pair) for pair in _pair_probabilities(score_sets, length_sets, noise, length_bias))


def bayes_accuracy(score_sets, length_sets=None, *, noise: float, length_bias: float = 0.0) -> float:
    """The best expected accuracy against one labeler, mean max(p, 1 - p): always pick the
    likelier winner."""
    return _mean(max(p, 1 - p) for *_, p in _pair_probabilities(score_sets, length_sets, noise, length_bias))
