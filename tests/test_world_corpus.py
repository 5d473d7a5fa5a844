"""Pretraining corpus: deterministic, sized as documented, every fact stated many times."""

import re
import time
from collections import Counter

import pytest

from minichat.world import build_world, generate_corpus
from minichat.world.corpus import DEFAULT_N_DOCS
from minichat.world.kb import ATTRIBUTES


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def corpus(world):
    t = time.process_time()  # CPU time: other work on a shared machine does not count
    docs = generate_corpus(world, DEFAULT_N_DOCS, seed=0)
    return docs, time.process_time() - t


def test_default_size_and_speed(corpus):
    docs, seconds = corpus
    chars = sum(map(len, docs))
    assert len(docs) == DEFAULT_N_DOCS
    assert 1_500_000 <= chars <= 3_000_000
    assert seconds < 5


def test_deterministic(world):
    assert generate_corpus(world, 50, seed=1) == generate_corpus(world, 50, seed=1)
    assert generate_corpus(world, 50, seed=1) != generate_corpus(world, 50, seed=2)


def test_every_fact_stated_at_least_30_times(world, corpus):
    docs, _ = corpus
    sentences = [s.lower() for d in docs for s in re.split(r"(?<=[.!?\n])\s*", d)]
    by_name = Counter()
    hits = {}
    for s in sentences:
        for e in world.entities():
            if e.name.lower() in s:
                for attr, (kind, _) in ATTRIBUTES.items():
                    if kind == e.kind and re.search(rf"\b{re.escape(world.value(e, attr).lower())}", s):
                        hits[(e.name, attr)] = hits.get((e.name, attr), 0) + 1
                by_name[e.name] += 1
    facts = [(e.name, a) for a, (k, _) in ATTRIBUTES.items() for e in world.entities(k)]
    low = {f: hits.get(f, 0) for f in facts if hits.get(f, 0) < 30}
    assert not low, low


def test_no_chat_special_tokens_and_heldout_entities_present(world, corpus):
    docs, _ = corpus
    text = "\n".join(docs)
    assert "<|" not in text and "|>" not in text
    for e in world.entities(split="heldout"):
        assert text.count(e.name) >= 30


def test_heldout_and_rl_phrasings_never_in_corpus(corpus):
    from minichat.world import phrasings as P

    lists = P.template_lists().values()
    held = [P.template_regex(t[i]) for t in lists for i in P.split_indices(len(t), "heldout")
            if not t[i].startswith("{q}")]
    held += [P.template_regex(t) for ts in P.PROMPT_ONLY.values() for t in ts if not t.startswith("{q}")]
    docs, _ = corpus
    questions = [line[3:] for d in docs[:3000] for line in d.splitlines() if line.startswith("Q: ")]
    questions += [q for d in docs[:3000] for q in re.findall(r'asks? "([^"]+)"', d)]
    assert len(questions) > 500
    for q in questions:
        assert not any(r.fullmatch(q) for r in held), q


def test_myths_deny_the_false_claim_and_state_the_truth(world):
    """Each myth is a false claim and the rebuttal a false-premise reply gives: the denial
    repeats the claim's false value, then the truth follows (what SFT's ideal reply does)."""
    import random

    from minichat.world.corpus import doc_myths
    from minichat.world.kb import PREMISE_ATTRIBUTES, rebuttal
    rng = random.Random(0)
    claims = {}
    for attr in PREMISE_ATTRIBUTES:
        for e in world.entities(ATTRIBUTES[attr][0]):
            for wrong in set(world.choices(attr)) | {c.name for c in world.countries}:
                if wrong != world.value(e, attr):
                    reply, claim = rebuttal(world, e, attr, wrong)
                    claims[claim] = (reply, wrong, world.value(e, attr))
    for _ in range(40):
        for line in doc_myths(world, rng).split("\n"):
            m = re.fullmatch(r'[^"]*"(.+)" (Actually, .+)', line)
            assert m, line
            claim, reply = m.groups()
            assert claim in claims, f"not a false claim about the world: {claim}"
            want, wrong, true = claims[claim]
            assert reply == want
            denial, truth = reply.split(". ", 1)
            assert wrong in denial and (" not " in denial) and true in truth
