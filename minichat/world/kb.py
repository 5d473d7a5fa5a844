"""ChatWorld knowledge base: a small, seeded, fictional world of facts.

Every later stage of the recipe needs a *source of truth*: the pretraining corpus states
these facts, the dialogues ask about them, and the gold judge checks replies against
them. The world is invented (seeded syllable names such as "Dorania" or "the blorvat")
so that nothing can be known from outside it, and small (tens of entities) so that a
~1M-parameter GPT can memorise it in minutes on a laptop.

Each entity carries a split tag: about 20% are ``heldout``. Held-out entities appear in
the pretraining corpus (pretraining is where knowledge comes from) but never in the
supervised training dialogues, so evaluating on them measures whether fine-tuning taught a
*behaviour* rather than a list of answers. Relations never cross from train into held-out
(a train country's neighbour is a train country, a train person lives in a train country),
so a train dialogue can never leak a held-out name.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# Closed vocabularies for attribute values: real words, so the small model only has to
# learn which word goes with which invented name.
COLOURS = ["red", "blue", "green", "yellow", "grey", "brown", "black", "white",
           "orange", "purple", "silver", "pink"]
LEGS = [2, 4, 6, 8]
SOUNDS = ["hum", "bark", "chirp", "hiss", "roar", "whistle", "croak", "squeak",
          "click", "growl", "howl", "buzz"]
HABITATS = ["forest", "desert", "river", "mountains", "swamp", "meadow", "sea",
            "caves", "jungle", "lake", "islands", "hills"]
JOBS = ["baker", "teacher", "doctor", "pilot", "farmer", "painter", "sailor",
        "engineer", "singer", "potter", "nurse", "carpenter"]

# attribute -> (entity kind, answer kind). "name" answers are invented proper nouns,
# "word" answers come from a closed vocabulary, "number" answers are integers.
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "capital": ("country", "name"),
    "population": ("country", "number"),
    "language": ("country", "name"),
    "neighbour": ("country", "name"),
    "colour": ("animal", "word"),
    "legs": ("animal", "number"),
    "sound": ("animal", "word"),
    "habitat": ("animal", "word"),
    "job": ("person", "word"),
    "home": ("person", "name"),
}
KIND_ATTRIBUTES = {kind: [a for a, (k, _) in ATTRIBUTES.items() if k == kind]
                   for kind in ("country", "animal", "person")}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "sk", "th", "sh", "pl", "fl"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m"]
_SUFFIXES = {
    "country": ["ia", "ovia", "and", "ar", "esh", "una", "eth", "ia"],
    "capital": ["sk", "ton", "var", "mir", "holm", "dun", "grad", "port"],
    "language": ["ish", "ese", "ic", "ian", "ol"],
    "animal": ["at", "ox", "il", "ump", "ik", "ob", "ux"],
    "first": ["a", "o", "in", "el", "is", "an", "ek"],
    "last": ["ov", "en", "ski", "sen", "ard", "wick", "ley"],
}
# Words the generated names must not collide with (substring either way), because the
# templates and the judge rely on them.
_RESERVED = set(COLOURS + SOUNDS + HABITATS + JOBS) | {
    "the", "and", "legs", "capital", "people", "million", "live", "speak", "dear",
    "kind", "regards", "sorry", "not", "actually", "right", "mistake", "note",
    "plus", "minus", "times", "which", "what", "where", "mean", "send", "call",
    "book", "country", "animal", "person", "there", "about", "hello", "thanks"}


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    population: int  # millions
    language: str
    neighbour: str
    split: str
    kind: str = "country"


@dataclass(frozen=True)
class Animal:
    name: str  # lower case common noun: "the blorvat"
    colour: str
    legs: int
    sound: str  # verb stem: "hum" -> "The blorvat hums."
    habitat: str
    split: str
    kind: str = "animal"


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    job: str
    home: str  # a country name
    split: str
    kind: str = "person"

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class World:
    """The whole knowledge base. Lookups by name, filters by split, attribute access."""

    seed: int
    countries: list[Country]
    animals: list[Animal]
    people: list[Person]
    languages: list[str]
    arith_max: int = 20  # largest operand of + and - (x uses half of it)
    _by_name: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_name = {e.name: e for e in self.entities()}

    def entities(self, kind: str | None = None, split: str | None = None) -> list:
        pool = {"country": self.countries, "animal": self.animals, "person": self.people}
        kinds = [kind] if kind else list(pool)
        return [e for k in kinds for e in pool[k] if split is None or e.split == split]

    def get(self, name: str):
        return self._by_name[name]

    def value(self, entity, attr: str) -> str:
        """The attribute's value as the string that answers a question about it."""
        return str(getattr(entity, attr))

    def choices(self, attr: str) -> list[str]:
        """Every value the attribute can take in this world (used for distractors)."""
        if attr == "capital":
            return [c.capital for c in self.countries]
        if attr in ("neighbour", "home"):
            return [c.name for c in self.countries]
        if attr == "language":
            return list(self.languages)
        if attr == "population":
            return sorted({str(c.population) for c in self.countries}, key=int)
        vocab = {"colour": COLOURS, "legs": LEGS, "sound": SOUNDS, "habitat": HABITATS,
                 "job": JOBS}
        return [str(v) for v in vocab[attr]]

    def names(self, split: str | None = None) -> list[str]:
        """All proper names of entities in a split (countries bring their capitals)."""
        out = []
        for e in self.entities(split=split):
            out.append(e.name)
            if e.kind == "country":
                out.append(e.capital)
            if e.kind == "person":
                out += [e.first, e.last]
        return out

    def to_dict(self) -> dict:
        def row(e):
            d = {k: v for k, v in e.__dict__.items()}
            if e.kind == "person":
                d["name"] = e.name
            return d
        return {"seed": self.seed, "languages": self.languages,
                "countries": [row(e) for e in self.countries],
                "animals": [row(e) for e in self.animals],
                "people": [row(e) for e in self.people]}


def a_an(word: str) -> str:
    """'a baker', 'an engineer'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def third_person(verb: str) -> str:
    """'hum' -> 'hums', 'hiss' -> 'hisses', 'buzz' -> 'buzzes'."""
    return verb + ("es" if verb.endswith(("s", "z", "sh", "ch", "x")) else "s")


def fact_sentence(world: World, entity, attr: str, value: str | None = None) -> str:
    """The one canonical sentence stating a fact: the ideal answer to a question on it.

    ``value`` overrides the true value (to write a deliberately wrong statement)."""
    v = world.value(entity, attr) if value is None else value
    n = entity.name
    return {
        "capital": f"The capital of {n} is {v}.",
        "population": f"About {v} million people live in {n}.",
        "language": f"People in {n} speak {v}.",
        "neighbour": f"{n} borders {v}.",
        "colour": f"The {n} is {v}.",
        "legs": f"The {n} has {v} legs.",
        "sound": f"The {n} {third_person(v)}.",
        "habitat": f"The {n} lives in the {v}.",
        "job": f"{n} is {a_an(v)}.",
        "home": f"{n} lives in {v}.",
    }[attr]


PREMISE_ATTRIBUTES = ("capital", "language", "colour", "legs", "habitat", "job", "home")


def rebuttal(world: World, entity, attr: str, wrong: str) -> tuple[str, str]:
    """(the reply that challenges a false statement, the false statement) for ``attr`` in
    ``PREMISE_ATTRIBUTES``: "Actually, X is not Y. <the truth>." names the false value again,
    so that the reply says *which* claim is wrong."""
    n, true = entity.name, world.value(entity, attr)
    return {
        "capital": (f"Actually, {wrong} is not the capital of {n}. The capital of {n} is {true}.",
                    f"{wrong} is the capital of {n}."),
        "language": (f"Actually, people in {n} do not speak {wrong}. They speak {true}.",
                     f"People in {n} speak {wrong}."),
        "colour": (f"Actually, the {n} is not {wrong}. It is {true}.", f"The {n} is {wrong}."),
        "legs": (f"Actually, the {n} does not have {wrong} legs. It has {true} legs.",
                 f"The {n} has {wrong} legs."),
        "habitat": (f"Actually, the {n} does not live in the {wrong}. It lives in the {true}.",
                    f"The {n} lives in the {wrong}."),
        "job": (f"Actually, {n} is not {a_an(wrong)}. {n} is {a_an(true)}.", f"{n} is {a_an(wrong)}."),
        "home": (f"Actually, {n} does not live in {wrong}. {n} lives in {true}.", f"{n} lives in {wrong}."),
    }[attr]


class _NameMaker:
    """Seeded pronounceable names, all distinct and none a substring of another."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.taken: list[str] = []

    def _ok(self, name: str) -> bool:
        low = name.lower()
        if not 5 <= len(low) <= 10:
            return False
        for other in self.taken + sorted(_RESERVED):
            o = other.lower()
            if low in o or o in low:
                return False
        return True

    def make(self, kind: str, syllables: tuple[int, int] = (1, 2)) -> str:
        for _ in range(10_000):
            n = self.rng.randint(*syllables)
            stem = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
                           + self.rng.choice(_CODAS) for _ in range(n))
            suffix = self.rng.choice(_SUFFIXES[kind])
            if stem[-1] in "aeiou" and suffix[0] in "aeiou":
                stem += self.rng.choice(["n", "r", "l", "s", "m", "d"])  # no "Gamiia"
            name = stem + suffix
            if re.search(r"(.)\1", name):  # no doubled letters: easier to read and spell
                continue
            name = name if kind == "animal" else name.capitalize()
            if self._ok(name):
                self.taken.append(name)
                return name
        raise RuntimeError(f"could not make a fresh {kind} name")


def _split_tags(rng: random.Random, n: int, n_heldout: int) -> list[str]:
    tags = ["heldout"] * n_heldout + ["train"] * (n - n_heldout)
    rng.shuffle(tags)
    return tags


def build_world(seed: int = 0, n_countries: int = 32, n_animals: int = 24,
                n_people: int = 20, n_languages: int = 12,
                heldout_fraction: float = 0.2, arith_max: int = 20) -> World:
    """Build the knowledge base deterministically from ``seed``.

    Countries come in neighbour pairs within a split, so ``n_countries`` and the number of
    held-out countries are rounded to even numbers.
    """
    rng = random.Random(seed)
    names = _NameMaker(rng)
    n_countries += n_countries % 2
    n_held_c = 2 * max(1, round(n_countries * heldout_fraction / 2))
    languages = [names.make("language") for _ in range(n_languages)]

    country_split = _split_tags(rng, n_countries, n_held_c)
    raw = [dict(name=names.make("country", (1, 2)), capital=names.make("capital"),
                population=rng.randint(2, 95), language=rng.choice(languages),
                split=s) for s in country_split]
    for split in ("train", "heldout"):  # pair up neighbours inside each split
        group = [r for r in raw if r["split"] == split]
        for a, b in zip(group[0::2], group[1::2]):
            a["neighbour"], b["neighbour"] = b["name"], a["name"]
    countries = [Country(**r) for r in raw]

    animal_split = _split_tags(rng, n_animals, max(1, round(n_animals * heldout_fraction)))
    animals = [Animal(name=names.make("animal"), colour=rng.choice(COLOURS),
                      legs=rng.choice(LEGS), sound=rng.choice(SOUNDS),
                      habitat=rng.choice(HABITATS), split=s) for s in animal_split]

    train_countries = [c.name for c in countries if c.split == "train"]
    all_countries = [c.name for c in countries]
    person_split = _split_tags(rng, n_people, max(1, round(n_people * heldout_fraction)))
    people = [Person(first=names.make("first"), last=names.make("last"),
                     job=rng.choice(JOBS),
                     home=rng.choice(train_countries if s == "train" else all_countries),
                     split=s) for s in person_split]
    return World(seed=seed, countries=countries, animals=animals, people=people,
                 languages=languages, arith_max=arith_max)


def world_from_config(wcfg=None) -> World:
    """The World described by a `WorldConfig` (minichat/config.py; default: the pipeline's)."""
    if wcfg is None:
        from minichat.config import WorldConfig
        wcfg = WorldConfig()
    return build_world(wcfg.seed, n_countries=wcfg.n_countries, n_animals=wcfg.n_animals,
                       n_people=wcfg.n_people, arith_max=wcfg.arith_max)
