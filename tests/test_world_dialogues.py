"""Dialogue families: structure, balance, determinism, and no held-out leakage into train."""

import re
from collections import Counter

import pytest

from minichat.world import FAMILIES, build_world, generate_dialogues, to_prompt
from minichat.world import phrasings as P
from minichat.world.dialogues import arithmetic_heldout


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def train(world):
    return generate_dialogues(world, 2200, "train", seed=0)


@pytest.fixture(scope="module")
def heldout(world):
    return generate_dialogues(world, 1100, "heldout", seed=0)


def _heldout_regexes():
    """A regex per held-out template of every list (but the bare "{q}", which fills anything)."""
    return [P.template_regex(t[i]) for t in P.template_lists().values() for i in P.split_indices(len(t), "heldout")
            if not t[i].startswith("{q}")]


def test_structure(train, heldout):
    for d in train + heldout:
        msgs = d["messages"]
        assert d["family"] in FAMILIES and d["split"] in ("train", "heldout")
        assert all(set(m) == {"role", "content"} and m["content"] for m in msgs)
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert all(m["role"] == "system" for m in msgs[:len(msgs) - len(roles)])
        assert roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * len(roles[1::2])
        assert roles[-1] == "assistant" and d["meta"]["ideal"] == msgs[-1]["content"]
        assert sum(len(m["content"]) for m in msgs) < 800  # fits a 256-token context
        assert len(msgs[-1]["content"].split()) <= 30


def test_balanced_and_multi_turn(train):
    counts = Counter(d["family"] for d in train)
    assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    for family in ("followup", "correction", "rewrite", "summary"):
        assert all(len(d["messages"]) >= 4 for d in train if d["family"] == family)


def test_deterministic_and_family_filter(world):
    a = generate_dialogues(world, 30, "train", seed=4)
    assert a == generate_dialogues(world, 30, "train", seed=4)
    assert a != generate_dialogues(world, 30, "train", seed=5)
    only = generate_dialogues(world, 10, "heldout", seed=4, families=["clarify", "summary"])
    assert {d["family"] for d in only} == {"clarify", "summary"}
    with pytest.raises(ValueError):
        generate_dialogues(world, 3, "train", families=["nope"])


def test_no_heldout_entity_in_train(world, train):
    held = {n.lower() for n in world.names("heldout")}
    for d in train:
        text = " ".join(m["content"] for m in d["messages"]).lower()
        words = set(re.findall(r"[a-z]+", text))
        assert not (held & words), (held & words, d)
        assert not any(h in text for h in held if " " in h)


def test_heldout_dialogues_are_about_heldout_entities(world, heldout):
    held = set(world.names("heldout"))
    for d in heldout:
        if "subject" in d["meta"]:
            assert d["meta"]["subject"] in held
    with_entities = [d for d in heldout if d["meta"]["entities"]]
    assert all(set(d["meta"]["entities"]) & held for d in with_entities)
    for d in heldout:  # held-out operand pairs too (a chained step adds to a result)
        m = d["meta"]
        if d["family"] == "arithmetic" and "arith.chain#3" not in m["templates"]:
            assert arithmetic_heldout(int(m["operands"][0]), int(m["operands"][1]), m["op"])


def test_no_heldout_template_in_train(train, heldout):
    lists = P.template_lists().items()
    held_ids = {f"{k}#{i}" for k, t in lists for i in P.split_indices(len(t), "heldout")}
    train_ids = {tid for d in train for tid in d["meta"]["templates"]}
    assert not (train_ids & held_ids)
    assert sum("#t" in tid for tid in train_ids) > 300  # the demonstrations use MORE_TRAIN too
    assert {tid for d in heldout for tid in d["meta"]["templates"]} <= held_ids
    # and by text: no training user message is a filling of a held-out template
    held_res = _heldout_regexes()
    for d in train[:600]:
        for m in d["messages"]:
            if m["role"] == "user":
                assert not any(r.fullmatch(m["content"]) for r in held_res), m["content"]
    # positive control: the regexes do recognise held-out phrasings
    finals = [d["messages"][-2]["content"] for d in heldout if d["family"] == "fact"]
    assert all(any(r.fullmatch(q) for r in held_res) for q in finals)


def _slots(template):
    return set(re.findall(r"\{(\w+)\}", template))


def test_extra_phrasings_cover_every_list_with_its_slots_and_match_no_other_set():
    """MORE_TRAIN (demonstrations) and PROMPT_ONLY (RL prompts) extend every template list.
    Within a list, no phrasing of one set (train, held out, MORE_TRAIN, PROMPT_ONLY) fills,
    or is filled by, one of another, and neither extra set fills any list's held-out phrasing.
    (Across lists shapes may meet: "What sound does the animal make?" asks for clarification
    in the shape of a fact question, as in the train lists themselves.)"""
    lists = P.template_lists()
    assert set(P.MORE_TRAIN) == set(P.PROMPT_ONLY) == set(lists)
    held = [t[i] for t in lists.values() for i in P.split_indices(len(t), "heldout")]

    def fills(a, b):  # `a` is a filling of template `b`
        return not b.startswith("{q}") and P.template_regex(b).fullmatch(a)

    for key, ts in lists.items():
        known = set().union(*(_slots(t) for i, t in enumerate(ts) if i not in P.split_indices(len(ts), "heldout")))
        sets = {"train+held": ts, "more_train": P.MORE_TRAIN[key], "rl": P.PROMPT_ONLY[key]}
        for name in ("more_train", "rl"):
            extra = sets[name]
            assert len(extra) >= 4 and len(set(extra)) == len(extra), (key, name)
            for t in extra:
                assert _slots(t) <= known, (key, t)
                others = [o for n, v in sets.items() if n != name for o in v] + held
                for o in others:
                    assert not fills(t, o) and not fills(o, t), (key, t, o)


def test_rl_dialogues_use_rl_phrasings_and_train_entities(world, train, heldout):
    rl = generate_dialogues(world, 1100, "train", seed=0, phrasing_split="rl")
    assert Counter(d["family"] for d in rl) == Counter({f: 100 for f in FAMILIES})
    ids = [t for d in rl for t in d["meta"]["templates"]]
    assert ids and all("#rl" in t for t in ids)
    held = set(world.names("heldout"))
    assert not any(set(d["meta"]["entities"]) & held for d in rl)
    # by text: no RL user turn is a filling of a held-out template
    res = _heldout_regexes()
    for d in rl[:600]:
        for m in d["messages"]:
            if m["role"] == "user":
                assert not any(r.fullmatch(m["content"]) for r in res), m["content"]
    assert not any("#rl" in t for d in train + heldout for t in d["meta"]["templates"])
    with pytest.raises(ValueError, match="phrasing_split must be one of"):
        generate_dialogues(world, 2, "train", phrasing_split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        generate_dialogues(world, 2, "rl")


def test_correction_marks_the_deliberate_mistake(train):
    cases = Counter()
    for d in (x for x in train if x["family"] == "correction"):
        m = d["meta"]
        cases[m["case"]] += 1
        if m["case"] == "admit":
            (i,) = m["wrong_turns"]
            assert d["messages"][i]["role"] == "assistant"
            assert m["wrong"] in d["messages"][i]["content"]
        else:
            assert m["wrong_turns"] == []
    assert cases["admit"] > 20 and cases["hold"] > 20


def test_to_prompt(train):
    for d in train[:50]:
        p = to_prompt(d)
        assert p["messages"] == d["messages"][:-1] and p["messages"][-1]["role"] == "user"
        assert p["ideal"] == d["messages"][-1]["content"]
        assert (p["family"], p["split"], p["meta"]) == (d["family"], d["split"], d["meta"])


def test_a_small_world_still_generates_every_family_in_both_splits():
    from minichat.world import FAMILIES, build_world, generate_dialogues
    world = build_world(0, n_countries=8, n_animals=6, n_people=5, arith_max=10)
    for split in ("train", "heldout"):
        dialogues = generate_dialogues(world, 30 * len(FAMILIES), split, seed=3)
        assert {d["family"] for d in dialogues} == set(FAMILIES)


def test_augment_wraps_only_train_user_turns_and_changes_nothing_else(world, train, heldout):
    aug = generate_dialogues(world, 2200, "train", seed=0, augment=0.5)
    wrapped = 0
    for d, a in zip(train, aug):
        assert d["family"] == a["family"] and d["meta"] == a["meta"]
        for m, n in zip(d["messages"], a["messages"]):
            if m["role"] != "user":
                assert m == n
            elif m["content"] != n["content"]:
                wrapped += 1
                assert any(n["content"] == p + m["content"] for p in P.USER_PREFIXES) or \
                    any(n["content"] == m["content"] + s for s in P.USER_SUFFIXES)
    n_user = sum(m["role"] == "user" for d in train for m in d["messages"])
    assert abs(wrapped / n_user - 0.5) < 0.05
    assert generate_dialogues(world, 1100, "heldout", seed=0, augment=0.5) == heldout
