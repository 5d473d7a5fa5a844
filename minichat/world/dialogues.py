"""ChatWorld dialogue families: demonstration conversations with ideal assistant replies.

Each family mirrors one behaviour from the ChatGPT blog post's sample dialogues (answer
follow-up questions, admit mistakes, challenge false premises, refuse inappropriate
requests, ask clarifying questions, state capability limits, summarise). A dialogue is

    {"family": str, "split": "train"|"heldout",
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "meta": {...everything the gold judge needs about the final assistant turn...}}

and always ends with the assistant's ideal final reply. Earlier assistant turns are ideal
too, with one deliberate exception: in ``correction`` dialogues of case ``admit`` the
first answer is the mistake being corrected; its message index is listed in
``meta["wrong_turns"]`` so that SFT can mask it out of the loss.

The ``heldout`` split uses held-out entities *and* held-out user phrasings (see
phrasings.py); train dialogues never mention a held-out name. The RL stages' prompts are
train-split dialogues asked in the ``rl`` phrasings (``phrasing_split="rl"``).
"""

from __future__ import annotations

import random

from . import phrasings as P
from .kb import ATTRIBUTES, KIND_ATTRIBUTES, World, a_an, fact_sentence, rebuttal, third_person

FAMILIES = ["fact", "followup", "arithmetic", "false_premise", "harmful", "benign",
            "clarify", "correction", "rewrite", "capability", "summary"]
SPLITS = ("train", "heldout")  # entities (and arithmetic operand pairs)
PHRASING_SPLITS = ("train", "rl", "heldout")  # user phrasings (phrasings.py)
_SLOT = {"country": "c", "animal": "a", "person": "p"}


def lower_first(sentence: str) -> str:
    """'The capital of X is Y.' -> 'the capital of X is Y.' (proper nouns untouched)."""
    first = sentence.split(" ", 1)[0]
    return sentence[0].lower() + sentence[1:] if first in ("The", "About", "People") else sentence


def join_and(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


class _Ctx:
    """Per-dialogue state: the rng, the split, and which templates and names were used."""

    def __init__(self, world: World, rng: random.Random, split: str,
                 augment: float = 0.0, aug_rng: random.Random | None = None, phrasing_split: str | None = None):
        self.world, self.rng, self.split = world, rng, split
        self.phrasing_split = phrasing_split or split
        self.augment, self.aug_rng = augment, aug_rng
        self.templates: list[str] = []
        self.entities: list[str] = []

    def pick(self, key: str, templates: list[str]) -> str:
        name, t = P.pick(self.rng, templates, self.phrasing_split, key)
        self.templates.append(name)
        return t

    def entity(self, kind: str, exclude=()):
        """A subject entity: held-out dialogues ask about held-out entities."""
        pool = [e for e in self.world.entities(kind, self.split) if e.name not in exclude]
        e = self.rng.choice(pool)
        self.entities.append(e.name)
        return e

    def other(self, kind: str, exclude=()):
        """A secondary entity: never a held-out one in train dialogues."""
        split = "train" if self.split == "train" else None
        pool = [e for e in self.world.entities(kind, split) if e.name not in exclude]
        e = self.rng.choice(pool)
        self.entities.append(e.name)
        return e

    def user(self, text: str) -> dict:
        # A little surface noise (all lower case, no final punctuation), as users type.
        if self.rng.random() < 0.1:
            text = text.lower().rstrip("?.!")
        if self.augment and self.split == "train":  # its own rng: the dialogues stay the same
            r = self.aug_rng.random()
            if r < self.augment / 2:
                text = self.aug_rng.choice(P.USER_PREFIXES) + text
            elif r < self.augment:
                text = text + self.aug_rng.choice(P.USER_SUFFIXES)
        return {"role": "user", "content": text}

    def start(self) -> list[dict]:
        if self.rng.random() < 0.25:
            return [{"role": "system", "content": self.rng.choice(P.SYSTEM_PROMPTS)}]
        return []


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _distractors(world: World, attr: str, answer: str, subject: str) -> list[str]:
    return [v for v in world.choices(attr) if v != answer and v != subject]


def _fact_meta(ctx: _Ctx, entity, attr: str) -> dict:
    kind = ATTRIBUTES[attr][1]
    answer = ctx.world.value(entity, attr)
    return {"subject": entity.name, "attribute": attr, "kind": kind, "answer": answer,
            "distractors": [] if kind == "number" else
            _distractors(ctx.world, attr, answer, entity.name),
            # same-kind names: a reply about one of these instead is about the wrong subject
            "other_subjects": [e.name for e in ctx.world.entities(entity.kind) if e.name != entity.name]}


def _ask_fact(ctx: _Ctx, entity, attr: str) -> list[dict]:
    q = ctx.pick(f"fact.{attr}", P.FACT_Q[attr]).format(**{_SLOT[entity.kind]: entity.name})
    return [ctx.user(q), _assistant(fact_sentence(ctx.world, entity, attr))]


def _random_attr(ctx: _Ctx) -> tuple:
    attr = ctx.rng.choice(list(ATTRIBUTES))
    return ctx.entity(ATTRIBUTES[attr][0]), attr


def build_fact(ctx: _Ctx):
    entity, attr = _random_attr(ctx)
    return ctx.start() + _ask_fact(ctx, entity, attr), _fact_meta(ctx, entity, attr)


def build_followup(ctx: _Ctx):
    kind = ctx.rng.choice(["country", "animal", "person"])
    entity = ctx.entity(kind)
    first, second = ctx.rng.sample(KIND_ATTRIBUTES[kind], 2)
    msgs = ctx.start() + _ask_fact(ctx, entity, first)
    if kind != "person" and ctx.rng.random() < 0.3:  # sometimes an extra step, so "it" must carry further
        third = ctx.rng.choice([a for a in KIND_ATTRIBUTES[kind] if a not in (first, second)])
        msgs += [ctx.user(ctx.pick(f"followup.{third}", P.FOLLOWUP_Q[third])),
                 _assistant(fact_sentence(ctx.world, entity, third))]
    msgs += [ctx.user(ctx.pick(f"followup.{second}", P.FOLLOWUP_Q[second])),
             _assistant(fact_sentence(ctx.world, entity, second))]
    return msgs, _fact_meta(ctx, entity, second)


def arithmetic_heldout(a: int, b: int, op: str) -> bool:
    """A fixed ~20% of operand pairs are reserved for held-out evaluation."""
    return (a * 7 + b * 13 + len(op)) % 5 == 0


def _operands(ctx: _Ctx, op: str) -> tuple[int, int]:
    while True:
        hi = ctx.world.arith_max // 2 if op == "times" else ctx.world.arith_max
        a, b = ctx.rng.randint(0, hi), ctx.rng.randint(0, hi)
        if op == "minus" and b > a:
            a, b = b, a
        if arithmetic_heldout(a, b, op) == (ctx.split == "heldout"):
            return a, b


def arith_sentence(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b} is {P.OPS[op](a, b)}."


def _arith_meta(a: int, op: str, b: int) -> dict:
    return {"kind": "number", "answer": str(P.OPS[op](a, b)), "operands": [str(a), str(b)],
            "op": op, "distractors": []}


def _ask_arith(ctx: _Ctx) -> tuple[list[dict], tuple]:
    op = ctx.rng.choice(list(P.OPS))
    a, b = _operands(ctx, op)
    q = ctx.pick(f"arith.{op}", P.ARITH_Q[op]).format(a=a, b=b)
    return [ctx.user(q), _assistant(arith_sentence(a, op, b))], (a, op, b)


def build_arithmetic(ctx: _Ctx):
    msgs, (a, op, b) = _ask_arith(ctx)
    msgs = ctx.start() + msgs
    if ctx.rng.random() < 0.3:  # a chained step: "And if you add 3 to that?"
        a, op, b = P.OPS[op](a, b), "plus", ctx.rng.randint(1, 9)
        q = ctx.pick("arith.chain", P.ARITH_CHAIN_Q).format(b=b)
        msgs += [ctx.user(q), _assistant(arith_sentence(a, op, b))]
    return msgs, _arith_meta(a, op, b)


def _premise(ctx: _Ctx):
    """A false statement about a subject: (entity, attr, wrong value, ideal, premise)."""
    attr = ctx.rng.choice(list(P.PREMISE_Q))
    e = ctx.entity(ATTRIBUTES[attr][0])
    true = ctx.world.value(e, attr)
    if attr == "capital":
        wrong = ctx.other("country", exclude=[e.name]).capital
    elif attr == "home":
        wrong = ctx.other("country", exclude=[e.home]).name
    else:
        wrong = ctx.rng.choice([v for v in ctx.world.choices(attr) if v != true])
    ideal, premise = rebuttal(ctx.world, e, attr, wrong)
    return e, attr, wrong, ideal, premise


def build_false_premise(ctx: _Ctx):
    e, attr, wrong, ideal, premise = _premise(ctx)
    t = ctx.pick(f"premise.{attr}", P.PREMISE_Q[attr])
    q = t.format(w=wrong, w_a=a_an(wrong), **{_SLOT[e.kind]: e.name})
    meta = _fact_meta(ctx, e, attr)
    meta.update(false=wrong, premise=premise,
                distractors=[d for d in meta["distractors"] if d != wrong],
                operands=[wrong] if meta["kind"] == "number" else [])
    return ctx.start() + [ctx.user(q), _assistant(ideal)], meta


def _harm_slots(ctx: _Ctx, topic: dict) -> dict:
    text = " ".join(topic["harmful"] + topic["benign"])
    slots = {}
    if "{a}" in text:
        a = ctx.entity("animal")
        slots.update(a=a.name, h=a.habitat)
    if "{p}" in text:
        slots["p"] = ctx.entity("person").name
    if "{c}" in text:
        c = ctx.entity("country")
        slots.update(c=c.name, n=c.neighbour)
    return slots


def _harm_turn(ctx: _Ctx, topic: dict, slots: dict) -> list[dict]:
    q = ctx.pick(f"harmful.{topic['topic']}", topic["harmful"]).format(**slots)
    return [ctx.user(q), _assistant(topic["refusal"].format(**slots))]


def build_harmful(ctx: _Ctx):
    topic = ctx.rng.choice(P.HARM_TOPICS)
    slots = _harm_slots(ctx, topic)
    msgs = ctx.start()
    if ctx.rng.random() < 0.25:  # a harmless exchange first: refusals must not depend on position
        msgs += _ask_arith(ctx)[0]
    msgs += _harm_turn(ctx, topic, slots)
    return msgs, {"topic": topic["topic"]}


def build_benign(ctx: _Ctx):
    topic = ctx.rng.choice(P.HARM_TOPICS)
    slots = _harm_slots(ctx, topic)
    msgs = ctx.start()
    q = ctx.pick(f"benign.{topic['topic']}", topic["benign"]).format(**slots)
    if ctx.rng.random() < 0.5:  # the blog's pattern: refused, then the benign twin
        msgs += _harm_turn(ctx, topic, slots)
        q = ctx.pick("benign.pivot", P.BENIGN_PIVOT).format(q=q)
    msgs += [ctx.user(q), _assistant(topic["answer"].format(**slots))]
    keywords = [k.format(**slots).lower() for k in topic["keywords"]]
    return msgs, {"topic": topic["topic"], "keywords": keywords,
                  "min_hits": min(2, len(keywords))}


def build_clarify(ctx: _Ctx):
    kind = ctx.rng.choice(list(P.CLARIFY_Q))
    msgs = ctx.start()
    if ctx.rng.random() < 0.3:  # an unrelated arithmetic turn gives "it" nothing to refer to
        msgs += _ask_arith(ctx)[0]
    q = ctx.pick(f"clarify.{kind}", P.CLARIFY_Q[kind])
    msgs += [ctx.user(q), _assistant(f"Which {kind} do you mean?")]
    # what a guess would name: "Which animal do you mean? The bamil lives in the desert."
    guesses = {e.name for e in ctx.world.entities(kind)}
    for attr in KIND_ATTRIBUTES[kind]:
        guesses.update(ctx.world.choices(attr))
    return msgs, {"ask_kind": kind, "kind_words": P.CLARIFY_KIND_WORDS[kind],
                  "guess_words": sorted(guesses)}


def _correction_pair(ctx: _Ctx):
    """(question turn, true statement, wrong statement, meta) for a fact or a sum."""
    if ctx.rng.random() < 0.3:
        op = ctx.rng.choice(list(P.OPS))
        a, b = _operands(ctx, op)
        r = P.OPS[op](a, b)
        wrong = r + ctx.rng.choice([-2, -1, 1, 2]) if r >= 2 else r + ctx.rng.randint(1, 2)
        q = ctx.pick(f"arith.{op}", P.ARITH_Q[op]).format(a=a, b=b)
        meta = _arith_meta(a, op, b)
        return q, arith_sentence(a, op, b), f"{a} {op} {b} is {wrong}.", str(wrong), meta
    e, attr = _random_attr(ctx)
    while attr == "neighbour":  # a wrong neighbour would name a held-out country in train
        e, attr = _random_attr(ctx)
    meta = _fact_meta(ctx, e, attr)
    wrong = ctx.rng.choice(meta["distractors"] or
                           [v for v in ctx.world.choices(attr) if v != meta["answer"]])
    if attr == "capital":
        wrong = ctx.other("country", exclude=[e.name]).capital
    if attr == "home":
        wrong = ctx.other("country", exclude=[meta["answer"]]).name
    q = ctx.pick(f"fact.{attr}", P.FACT_Q[attr]).format(**{_SLOT[e.kind]: e.name})
    return (q, fact_sentence(ctx.world, e, attr), fact_sentence(ctx.world, e, attr, wrong),
            wrong, meta)


def _as_phrase(meta: dict, value: str) -> str:
    """How a bare value reads after 'not': 'the river', 'a baker', '47 million'."""
    return {"habitat": f"the {value}", "job": a_an(value), "population": f"{value} million",
            "legs": f"{value} legs", "sound": third_person(value)}.get(meta.get("attribute"), value)


def build_correction(ctx: _Ctx):
    q, true_s, wrong_s, wrong, meta = _correction_pair(ctx)
    case = ctx.rng.choice(["admit", "hold"])
    msgs = ctx.start() + [ctx.user(q)]
    # admit: the assistant slipped and the user is right; hold: the user is wrong.
    said, claimed = (wrong_s, true_s) if case == "admit" else (true_s, wrong_s)
    wrong_turns = [len(msgs)] if case == "admit" else []
    msgs.append(_assistant(said))
    t = ctx.pick("correction", P.CORRECTION_Q)
    msgs.append(ctx.user(t.format(s=claimed, sl=lower_first(claimed))))
    if case == "admit":
        ideal = f"You are right, I made a mistake. {true_s}"
    else:
        ideal = f"I checked again, and {lower_first(true_s)[:-1]}, not {_as_phrase(meta, wrong)}."
    msgs.append(_assistant(ideal))
    meta.update(case=case, wrong=wrong, wrong_turns=wrong_turns,
                distractors=[d for d in meta["distractors"] if d != wrong],
                operands=meta.get("operands", []) + ([wrong] if meta["kind"] == "number" else []))
    return msgs, meta


def _note(ctx: _Ctx):
    """A person to write to and one of the NOTES, filled in: (slots, request, casual, formal, keywords)."""
    person = ctx.entity("person")
    country = ctx.entity("country")
    slots = dict(first=person.first, name=person.name, c=country.name, job=person.job,
                 job_a=a_an(person.job))
    purpose, casual, formal, keywords = ctx.rng.choice(P.NOTES)
    slots["purpose"] = purpose.format(**slots)
    request = ctx.pick("note", P.NOTE_Q).format(**slots)
    keywords = [k.format(**slots).lower() for k in keywords] + [person.first.lower()]
    return slots, request, casual.format(**slots), formal.format(**slots), keywords


def build_rewrite(ctx: _Ctx):
    slots, request, casual, formal, keywords = _note(ctx)
    msgs = ctx.start() + [ctx.user(request), _assistant(casual),
                          ctx.user(ctx.pick("formal", P.FORMAL_Q)), _assistant(formal)]
    return msgs, {"recipient": slots["name"], "keywords": keywords, "casual": casual}


def build_capability(ctx: _Ctx):
    cap = ctx.rng.choice(P.CAPABILITIES)
    msgs, slots = ctx.start(), {"h": ctx.rng.randint(5, 9)}
    if cap["setup"] == "note":
        slots, request, casual, formal, _ = _note(ctx)
        msgs += [ctx.user(request), _assistant(casual)]
        if ctx.rng.random() < 0.5:
            msgs += [ctx.user(ctx.pick("formal", P.FORMAL_Q)), _assistant(formal)]
    else:
        p, c = ctx.entity("person"), ctx.entity("country")
        slots.update(p=p.name, c=c.name, cap=c.capital)
    ask = ctx.pick(f"capability.{cap['action']}", cap["asks"]).format(**slots)
    msgs += [ctx.user(ask), _assistant(cap["ideal"].format(**slots))]
    meta = {"action": cap["action"], "pretend": cap["pretend"].format(**slots)}
    # The offer is about what was asked: "I can tell you that Tistograd is the capital of
    # Stisar." does not help with the weather in Skograd (seen from an SFT policy).
    if "{cap}" in cap["ideal"]:
        meta["others"] = [n for c in ctx.world.countries if c.name != slots["c"] for n in (c.name, c.capital)]
    elif "{p}" in cap["ideal"]:
        meta["others"] = [e.name for e in ctx.world.people if e.name != slots["p"]]
    return msgs, meta


def build_summary(ctx: _Ctx):
    msgs, topics, recaps = ctx.start(), [], []
    n_topics = ctx.rng.choice([2, 3])
    used = []
    for i in range(n_topics):
        if ctx.rng.random() < 0.25:
            turn, (a, op, b) = _ask_arith(ctx)
            topics.append([str(a), str(b), str(P.OPS[op](a, b))])
            recaps.append(arith_sentence(a, op, b)[:-1])
        else:
            # only kinds with an entity not yet talked about (a small world may have two)
            attrs = [a for a in ATTRIBUTES if any(e.name not in used for e in
                                                   ctx.world.entities(ATTRIBUTES[a][0], ctx.split))]
            attr = ctx.rng.choice(attrs)
            e = ctx.entity(ATTRIBUTES[attr][0], exclude=used)
            used.append(e.name)
            turn = _ask_fact(ctx, e, attr)
            topics.append([e.name.lower(), ctx.world.value(e, attr)])  # who, and what was said
            recaps.append(lower_first(turn[1]["content"])[:-1])
        msgs += turn
    q = ctx.pick("summary", P.SUMMARY_Q)
    ideal = f"We talked about {['', '', 'two', 'three'][n_topics]} things: {join_and(recaps)}."
    msgs += [ctx.user(q), _assistant(ideal)]
    return msgs, {"topics": topics}


BUILDERS = {f: globals()[f"build_{f}"] for f in FAMILIES}


def generate_dialogues(world: World, n: int, split: str = "train", seed: int = 0,
                       families: list[str] | None = None, augment: float = 0.0,
                       phrasing_split: str | None = None) -> list[dict]:
    """``n`` dialogues, balanced across ``families`` (default: all), deterministic in ``seed``.
    ``augment``: share of train-split user turns wrapped in a greeting or a thanks
    (``phrasings.USER_PREFIXES``/``USER_SUFFIXES``); the dialogues are otherwise unchanged.
    ``phrasing_split`` (default: ``split``) picks the user phrasings apart from the
    entities, so evaluation can tell unseen entities from unseen wordings; ``"rl"`` asks in
    the phrasings only the RL stages' prompts use (``phrasings.PROMPT_ONLY``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if (phrasing_split or split) not in PHRASING_SPLITS:
        raise ValueError(f"phrasing_split must be one of {PHRASING_SPLITS}, got {phrasing_split!r}")
    families = list(families or FAMILIES)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; known: {FAMILIES}")
    rng = random.Random(seed * 2 + (split == "heldout"))
    aug_rng = random.Random(seed * 2 + 1001)
    out = []
    for i in range(n):
        family = families[i % len(families)]
        ctx = _Ctx(world, rng, split, augment, aug_rng, phrasing_split)
        messages, meta = BUILDERS[family](ctx)
        meta.update(ideal=messages[-1]["content"], templates=ctx.templates,
                    entities=sorted(set(ctx.entities)))
        out.append({"family": family, "split": split, "messages": messages, "meta": meta})
    rng.shuffle(out)
    return out


def to_prompt(example: dict) -> dict:
    """The conversation up to its final user turn, plus the ideal reply, for evaluation."""
    messages = example["messages"]
    assert messages[-1]["role"] == "assistant", "a dialogue ends with the assistant"
    return {"family": example["family"], "split": example["split"],
            "messages": [dict(m) for m in messages[:-1]], "meta": example["meta"],
            "ideal": messages[-1]["content"]}
