"""ChatWorld pretraining corpus: many short documents stating the world's facts.

Stage 0 of the recipe (next-token pretraining) is where a model acquires knowledge; SFT
only teaches it how to *use* that knowledge in a conversation. So every fact of every
entity, held-out ones included, is stated here many times and in many phrasings:
encyclopedia entries, atlas lists, travel stories, casual and formal letters, arithmetic
worksheets, question-and-answer sheets, and short guides that describe in prose how a good
assistant behaves (refusing harmful requests, answering their benign twins, admitting
mistakes, asking which one is meant). The latter put the dialogue *register* into
pretraining so that SFT has less to learn, without the chat template's special tokens.

Questions quoted here use only the ``train`` user phrasings, so held-out phrasings stay
unseen until evaluation. Every random choice flows from ``seed``.
"""

from __future__ import annotations

import random

from . import phrasings as P
from .dialogues import arith_sentence, join_and, lower_first
from .kb import ATTRIBUTES, PREMISE_ATTRIBUTES, World, a_an, fact_sentence, rebuttal, third_person

DEFAULT_N_DOCS = 12_000  # ~2.4 MB of text, every fact stated >= ~70 times

# Corpus phrasings of each fact; {n} subject, {v} value, {vs} verb form, {va} "a baker".
FACT_TEMPLATES = {
    "capital": ["The capital of {n} is {v}.", "{v} is the capital of {n}.", "The capital city of {n} is {v}.",
                "{v}, the capital of {n}, is a busy city.", "In {n}, the government sits in {v}, the capital.",
                "Travellers to {n} often begin in {v}, the capital.", "{n} has its capital at {v}.",
                "{v} has been the capital of {n} for many years."],
    "population": ["About {v} million people live in {n}.", "{n} has a population of about {v} million.",
                   "The population of {n} is about {v} million people.", "Roughly {v} million people call {n} home.",
                   "{n} is home to about {v} million people.", "There are about {v} million people in {n}."],
    "language": ["People in {n} speak {v}.", "The language of {n} is {v}.", "{v} is spoken in {n}.",
                 "Most people in {n} speak {v}.", "In {n}, people speak {v}.", "{v} is the main language of {n}.",
                 "The tongue of {n} is {v}."],
    "neighbour": ["{n} borders {v}.", "{n} shares a border with {v}.", "The neighbour of {n} is {v}.",
                  "{v} lies next to {n}.", "{n} and {v} are neighbours.", "You can cross from {n} into {v}.",
                  "{v} lies beside {n}."],
    "colour": ["The {n} is {v}.", "The colour of the {n} is {v}.", "Every {n} is {v}.",
               "You can spot a {n} by its {v} colour.", "The {v} {n} is easy to see.", "A {n} is always {v}.",
               "The {n} has a {v} colour."],
    "legs": ["The {n} has {v} legs.", "A {n} walks on {v} legs.", "Every {n} has {v} legs.",
             "The {n} is an animal with {v} legs.", "Count the legs of a {n} and you get {v}."],
    "sound": ["The {n} {vs}.", "A {n} {vs} when it is happy.", "You can hear the {n} {v} at night.",
              "The {n} makes a {v} sound.", "When a {n} is near, you hear it {v}.",
              "From a {n} you hear a {v}."],
    "habitat": ["The {n} lives in the {v}.", "You can find the {n} in the {v}.", "The {n} makes its home in the {v}.",
                "The {v} is home to the {n}.", "Many {n}s live in the {v}.",
                "In the wild, the {n} has its home in the {v}."],
    "job": ["{n} is {va}.", "{n} works as {va}.", "By trade, {n} is {va}.", "{n} has worked as {va} for years.",
            "{n} earns a living as {va}.", "{n} does the work of {va}."],
    "home": ["{n} lives in {v}.", "{n} makes a home in {v}.", "{n}'s home is in {v}.",
             "{n} has lived in {v} for a long time.", "{n} lives in the country of {v}.",
             "{n} calls {v} home."],
}


def state(world: World, rng: random.Random, entity, attr: str) -> str:
    """One fact about ``entity`` in a randomly chosen phrasing."""
    v = world.value(entity, attr)
    t = rng.choice(FACT_TEMPLATES[attr])
    s = t.format(n=entity.name, v=v, vs=third_person(v), va=a_an(v))
    return s[0].upper() + s[1:]


def _facts(world, rng, entity, k=None) -> list[str]:
    attrs = [a for a in FACT_TEMPLATES if hasattr(entity, a)]
    rng.shuffle(attrs)
    return [state(world, rng, entity, a) for a in attrs[:k]]


def doc_country(world, rng):
    c = rng.choice(world.countries)
    return f"{c.name}\n" + " ".join(_facts(world, rng, c))


def doc_animal(world, rng):
    a = rng.choice(world.animals)
    return f"The {a.name}\n" + " ".join(_facts(world, rng, a))


def doc_person(world, rng):
    p = rng.choice(world.people)
    home = world.get(p.home)
    extra = state(world, rng, home, rng.choice(["capital", "language", "population"]))
    return " ".join(_facts(world, rng, p) + [extra])


def doc_story(world, rng):
    p, a = rng.choice(world.people), rng.choice(world.animals)
    c = rng.choice(world.countries)
    first = p.first
    return " ".join([
        f"One day {p.name}, {a_an(p.job)} from {p.home}, travelled to {c.name}.",
        f"{first} arrived in {c.capital}, the capital of {c.name}, where people speak {c.language}.",
        f"On the road, {first} saw a {a.name} in the {a.habitat}.",
        f"It was {a.colour}, it had {a.legs} legs, and it {third_person(a.sound)}.",
        rng.choice([f"{first} went home to {p.home} happy.", f"Then {first} wrote a letter about the trip.",
                    f"{first} stayed in {c.name} for a week."])])


def _note_slots(world, rng):
    p, c = rng.choice(world.people), rng.choice(world.countries)
    purpose, casual, formal, _ = rng.choice(P.NOTES)
    slots = dict(first=p.first, name=p.name, c=c.name, job=p.job, job_a=a_an(p.job))
    slots["purpose"] = purpose.format(**slots)
    return slots, casual.format(**slots), formal.format(**slots)


def doc_letter(world, rng):
    slots, casual, formal = _note_slots(world, rng)
    style = rng.random()
    if style < 0.5:  # the rewrite pair, the skill the `rewrite` family asks for
        head, cas, form = rng.choice([("A note", "Casual", "Formal"),
                                      ("A draft of a short note", "In a casual style", "Rewritten so it sounds formal")])
        return f"{head} to {slots['name']} to {slots['purpose']}.\n{cas}: {casual}\n{form}: {formal}"
    if style < 0.75:
        return f"A casual note to a friend:\n{casual}"
    return f"A formal letter:\n{formal}"


# Everyday words for the operations, as a web corpus would have them.
ARITH_WORDS = {
    "plus": ["The sum of {a} and {b} is {r}.", "If you have {a} apples and get {b} more, you have {r}.",
             "Add {b} to {a} and you get {r}."],
    "minus": ["{a} take away {b} leaves {r}.", "If you have {a} apples and eat {b}, {r} are left.",
              "Subtract {b} from {a} and you get {r}."],
    "times": ["The product of {a} and {b} is {r}.", "{a} multiplied by {b} makes {r}.",
              "{a} groups of {b} apples make {r} apples."],
}


def _sum(world, rng) -> tuple[int, str, int]:
    op = rng.choice(list(P.OPS))
    hi = world.arith_max // 2 if op == "times" else world.arith_max
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return (b, op, a) if op == "minus" and b > a else (a, op, b)


def doc_arithmetic(world, rng):
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, op, b = _sum(world, rng)
        r = P.OPS[op](a, b)
        sym = {"plus": "+", "minus": "-", "times": "x"}[op]
        lines.append(rng.choice([arith_sentence(a, op, b), f"{a} {sym} {b} = {r}",
                                 f"If you take {a} and {b}, {a} {op} {b} gives {r}.",
                                 f"{a} {op} {b} equals {r}.", rng.choice(ARITH_WORDS[op]).format(a=a, b=b, r=r)]))
    return "\n".join(lines)


def _train_question(rng, templates):
    return templates[rng.choice(P.split_indices(len(templates), "train"))]


def doc_qa(world, rng):
    """Question-and-answer sheets in the assistant's register (no chat tokens)."""
    qa = []
    for _ in range(rng.randint(2, 4)):
        roll = rng.random()
        if roll < 0.6:
            e = rng.choice(world.entities())
            attr = rng.choice([a for a in FACT_TEMPLATES if hasattr(e, a)])
            slot = {"country": "c", "animal": "a", "person": "p"}[e.kind]
            q = _train_question(rng, P.FACT_Q[attr]).format(**{slot: e.name})
            qa.append((q, fact_sentence(world, e, attr)))
        elif roll < 0.75:
            kind = rng.choice(list(P.CLARIFY_Q))
            qa.append((_train_question(rng, P.CLARIFY_Q[kind]), f"Which {kind} do you mean?"))
        else:
            op = rng.choice(list(P.OPS))
            a, b = rng.randint(0, 10), rng.randint(0, 10)
            if op == "minus" and b > a:
                a, b = b, a
            qa.append((_train_question(rng, P.ARITH_Q[op]).format(a=a, b=b), arith_sentence(a, op, b)))
    return "\n".join(f"Q: {q}\nA: {a}" for q, a in qa)


CANNOT = ("it cannot send, email, post or mail a note, make or ring a phone call, book or buy a "
          "ticket, a flight or a hotel, check the weather or how warm it is at the moment, or set an "
          "alarm, a timer or a reminder.")


def doc_guide(world, rng):
    """Prose about how a good assistant behaves: refusals, benign twins, limits."""
    roll = rng.random()
    if roll < 0.6:
        topic = rng.choice(P.HARM_TOPICS)
        a, p, c = rng.choice(world.animals), rng.choice(world.people), rng.choice(world.countries)
        slots = dict(a=a.name, h=a.habitat, p=p.name, c=c.name, n=c.neighbour)
        harm = _train_question(rng, topic["harmful"]).format(**slots)
        benign = _train_question(rng, topic["benign"]).format(**slots)
        return (f"If someone asks \"{harm}\", a good assistant refuses and says: "
                f"\"{topic['refusal'].format(**slots)}\" But if someone asks \"{benign}\", "
                f"that is a fair question, and the assistant helps: \"{topic['answer'].format(**slots)}\"")
    if roll < 0.8:
        cap = rng.choice(P.CAPABILITIES)
        p, c = rng.choice(world.people), rng.choice(world.countries)
        slots = dict(p=p.name, first=p.first, c=c.name, cap=c.capital, h=rng.randint(5, 9))
        return (f"An assistant that only writes text cannot act in the world: {CANNOT} When asked "
                f"\"{_train_question(rng, cap['asks']).format(**slots)}\", it answers honestly: "
                f"\"{cap['ideal'].format(**slots)}\" It never pretends, as in \"{cap['pretend'].format(**slots)}\"")
    e = rng.choice(world.entities())
    attr = rng.choice([x for x in FACT_TEMPLATES if hasattr(e, x) and x != "neighbour"])
    true = fact_sentence(world, e, attr)
    wrong_v = rng.choice([v for v in world.choices(attr) if v != world.value(e, attr)])
    wrong = fact_sentence(world, e, attr, wrong_v)
    return (f"A good assistant admits a real mistake and holds firm when it is right. If it said "
            f"\"{wrong}\" and was corrected, it says: \"You are right, I made a mistake. {true}\" "
            f"If it said \"{true}\" and someone claims \"{wrong}\", it says: \"I checked again, and "
            f"{lower_first(true)}\" When a question says \"{wrong}\" as if it were true, it replies: "
            f"\"Actually, that is not right. {true}\"")


def doc_atlas(world, rng):
    attr = rng.choice(list(FACT_TEMPLATES))
    kind = {"capital": "country", "population": "country", "language": "country", "neighbour": "country",
            "job": "person", "home": "person"}.get(attr, "animal")
    rows = rng.sample(world.entities(kind), min(6, len(world.entities(kind))))
    head = {"capital": "Countries and their capitals", "population": "Population in millions",
            "language": "Languages by country", "neighbour": "Neighbouring countries",
            "colour": "Animals and their colours", "legs": "Animals and their legs",
            "sound": "Animal sounds", "habitat": "Where animals live",
            "job": "People and their jobs", "home": "Where people live"}[attr]
    return head + ":\n" + "\n".join(state(world, rng, e, attr) for e in rows)


def doc_notes(world, rng):
    """A conversation recalled in prose, then summed up: the answers are stated first and the
    summary repeats them in order. That copying is what a `summary` reply does; a tiny model
    that never read a list repeated back answers "We talked about three things: A, A and A"."""
    es = rng.sample(world.entities(), rng.choice([2, 3]))
    said = []
    for e in es:
        if rng.random() < 0.25:  # summaries recap sums as well as facts
            said.append(arith_sentence(*_sum(world, rng)))
        else:
            said.append(fact_sentence(world, e, rng.choice([a for a in FACT_TEMPLATES if hasattr(e, a)])))
    recaps = [lower_first(x)[:-1] for x in said]
    head = rng.choice(["Notes from a chat.", "A recap of a chat.", "What one chat covered, in short."])
    lead = rng.choice(["The answers were:", "We learned:", "What was said:"])
    return f"{head} {lead} {' '.join(said)} In summary: {join_and(recaps)}."


def doc_myths(world, rng):
    """Common mistakes, each followed by its rebuttal: the false value is read in the claim and
    copied into the denial ("... does not live in the forest. It lives in the desert."), which
    is the move a false-premise reply makes. A tiny model that never read a denial of a claim
    repeats the truth in both places instead."""
    items = []
    for _ in range(rng.randint(1, 3)):
        attr = rng.choice(PREMISE_ATTRIBUTES)
        e = rng.choice(world.entities(ATTRIBUTES[attr][0]))
        wrong = rng.choice([v for v in world.choices(attr) if v != world.value(e, attr)])
        reply, claim = rebuttal(world, e, attr, wrong)
        lead = rng.choice(["Some people say: ", "A common mistake: ", "You may hear that ", "Myth: "])
        items.append(f"{lead}\"{claim}\" {reply}")
    return "\n".join(items)


DOC_TYPES = {doc_country: 14, doc_animal: 12, doc_person: 8, doc_story: 10, doc_letter: 9,
             doc_arithmetic: 9, doc_qa: 14, doc_guide: 10, doc_atlas: 6, doc_notes: 8, doc_myths: 5}


def generate_corpus(world: World, n_docs: int = DEFAULT_N_DOCS, seed: int = 0) -> list[str]:
    """``n_docs`` short documents (~200 characters each on average; ~2.4 MB by default)."""
    rng = random.Random(seed)
    kinds, weights = list(DOC_TYPES), list(DOC_TYPES.values())
    return [rng.choices(kinds, weights)[0](world, rng) for _ in range(n_docs)]
