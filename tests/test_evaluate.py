"""Evaluation maths: win rates and their confidence intervals; the family table."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minichat.evaluate import family_table, win_rate


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.0, 0.5, 1.0])),
                min_size=2, max_size=60))
def test_win_rate_matches_brute_force_counting(pairs):
    a, b = map(np.array, zip(*pairs))
    r = win_rate(a, b)
    wins = sum(x > y for x, y in pairs)
    ties = sum(x == y for x, y in pairs)
    assert r["wins"] == wins and r["ties"] == ties and r["losses"] == len(pairs) - wins - ties
    assert r["win_rate"] == pytest.approx((wins + 0.5 * ties) / len(pairs))
    assert r["mean_diff"] == pytest.approx(np.mean(a - b))
    # swapping the policies mirrors the result
    s = win_rate(b, a)
    assert s["win_rate"] == pytest.approx(1 - r["win_rate"]) and s["mean_diff"] == pytest.approx(-r["mean_diff"])


def test_confidence_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        a = rng.normal(0.1, 1.0, 200)
        b = rng.normal(0.0, 1.0, 200)
        lo, hi = win_rate(a, b)["diff_ci"]
        covered += lo <= 0.1 <= hi
    assert 0.91 <= covered / 400 <= 0.99


def test_win_rate_interval_by_hand_and_its_coverage():
    # outcomes 1, 0.5, 1, 0.5: mean 0.75, sample sd sqrt(4 * 0.25**2 / 3), n = 4
    r = win_rate([1, 0, 1, 1], [0, 0, 0, 1])
    half = 1.96 * np.sqrt(4 * 0.25 ** 2 / 3) / 2
    assert r["win_ci"] == pytest.approx([0.75 - half, 0.75 + half])
    from math import erf, sqrt
    truth = 0.5 * (1 + erf(0.1 / sqrt(2) / sqrt(2)))  # P(a > b), a - b ~ N(0.1, 2)
    rng, covered = np.random.default_rng(1), 0
    for _ in range(400):
        lo, hi = win_rate(rng.normal(0.1, 1.0, 200), rng.normal(0.0, 1.0, 200))["win_ci"]
        covered += lo <= truth <= hi
    assert 0.91 <= covered / 400 <= 0.99


def test_family_table_means_per_family_and_overall():
    examples = [{"family": f} for f in ("fact", "fact", "clarify")]
    t = family_table(examples, [1.0, 0.0, 0.5], [True, False, True])
    assert t["fact"] == {"score": 0.5, "correct": 0.5, "n": 2}
    assert t["clarify"]["correct"] == 1.0 and t["all"]["n"] == 3
    assert t["all"]["score"] == pytest.approx(0.5)


def test_sample_replies_batches_by_length_but_answers_in_order():
    """Prompts are batched shortest first at per-batch widths; each reply must still be the
    one its own prompt gets when sampled alone (greedy, so padding must be invisible)."""
    from minichat.config import ModelConfig
    from minichat.evaluate import sample_replies
    from minichat.model import GPT
    from minichat.tokenizer import train_tokenizer
    from minichat.world import build_world, generate_dialogues, to_prompt

    world = build_world(0)
    dialogues = generate_dialogues(world, 40, "train", seed=5)
    tok = train_tokenizer([m["content"] for d in dialogues for m in d["messages"]], 400)
    prompts = [to_prompt(d) for d in dialogues[:10]]
    lengths = [len(tok.render_prompt(p["messages"])) for p in prompts]
    assert len({-(-n // 32) for n in lengths}) > 1  # the batches really get different widths
    model = GPT.init(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32), 0)
    kw = dict(max_new_tokens=6, temperature=0.0, seed=0)
    batched = sample_replies(model, tok, prompts, batch_size=4, **kw)
    alone = [sample_replies(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    assert len({r["text"] for r in alone}) > 3  # distinct replies: a mix-up would show
    assert batched == alone
    # n replies per prompt from one prefill: what the prompts repeated n times get (sampled)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3)
    shared = sample_replies(model, tok, prompts, batch_size=6, n=3, **kw)
    repeated = sample_replies(model, tok, [p for p in prompts for _ in range(3)], batch_size=6, **kw)
    assert len(shared) == 30 and shared == repeated
    assert len({r["text"] for r in shared}) > 10
