"""A deterministic synthetic world for the demo: invented countries and their capitals, languages, currencies.

Everything is made up (names built from syllables), so a model can only know a fact if it read it here. From
one seed come:

    pretraining corpus   every fact stated in several phrasings, as plain-text documents
    SFT rows             chat questions and short answers about the SFT countries only
    evaluation sets      questions about held-out countries, whose facts appear only in the corpus

so a rise in held-out accuracy after SFT shows instruction tuning unlocking knowledge the base already has.

    world = make_world(seed=0)
    write_world(world, Path("runs/demo/data"))
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
          "st", "sh", "th")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
CODAS = ("", "", "n", "r", "l", "s", "m", "x")
SUFFIXES = {
    "country": ("ia", "land", "mark", "ora", "istan", "ovia"),
    "capital": ("burg", "ford", "mar", "ton", "vik", "grad"),
    "language": ("ish", "ese", "ic", "an", "i"),
    "currency": ("", "o", "et", "ar", "ine"),
}

# Each fact is stated in all of these phrasings in the corpus; the variety (entity first, attribute first)
# makes the model store attributes with the country, where a question can reach them.
FACT_PHRASINGS = {
    "capital": (
        "The capital of {country} is {value}.",
        "{value} is the capital city of {country}.",
        "The government of {country} sits in {value}.",
        "Travellers to {country} often start in {value}, its capital.",
    ),
    "language": (
        "In {country}, people speak {value}.",
        "The language of {country} is {value}.",
        "{value} is the main language spoken in {country}.",
        "Children in {country} learn to read and write in {value}.",
    ),
    "currency": (
        "The currency of {country} is the {value}.",
        "In {country}, people pay with the {value}.",
        "The {value} is the money used in {country}.",
        "Shops in {country} set their prices in {value}s.",
    ),
}

# Questions never appear in the corpus: the base model has not seen this task, only the facts.
QUESTIONS = {
    "capital": (
        "What is the capital of {country}?",
        "Which city is the capital of {country}?",
        "Name the capital city of {country}.",
        "Where does the government of {country} sit?",
    ),
    "language": (
        "What language do people speak in {country}?",
        "Which language is spoken in {country}?",
        "Name the main language of {country}.",
        "In which language do children in {country} learn to read?",
    ),
    "currency": (
        "What is the currency of {country}?",
        "Which money is used in {country}?",
        "Name the currency people pay with in {country}.",
        "In what currency do shops in {country} set their prices?",
    ),
}
# Answers are whole sentences. A name right after "<|im_start|>assistant\n" would tokenise without its leading
# space, i.e. into other tokens than the corpus taught (" Marnburg" vs "Marnburg"); inside a sentence it keeps
# the corpus's tokens, so the answer draws on what pretraining stored rather than on a new spelling.
ANSWERS = {
    "capital": "The capital of {country} is {value}.",
    "language": "People in {country} speak {value}.",
    "currency": "The currency of {country} is the {value}.",
}
RELATIONS = tuple(FACT_PHRASINGS)


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    currency: str

    def fact(self, relation: str) -> str:
        return getattr(self, relation)


@dataclass(frozen=True)
class QA:
    """One question about one fact, with its reference answer (a sentence that states the fact)."""

    country: str
    relation: str
    question: str
    answer: str
    fact: str  # the attribute value the answer must get right

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": self.question}]
        if with_answer:
            turns.append({"role": "assistant", "content": self.answer})
        return turns


@dataclass(frozen=True)
class World:
    seed: int
    countries: tuple[Country, ...]
    sft_countries: tuple[str, ...]  # questions about these are SFT training data
    heldout_countries: tuple[str, ...]  # never asked about in SFT: the evaluation

    def by_name(self, name: str) -> Country:
        return next(c for c in self.countries if c.name == name)


def make_world(seed: int = 0, num_countries: int = 48, heldout_fraction: float = 0.3) -> World:
    """Invent `num_countries` countries with distinct names and split them into SFT and held-out sets.

    Args:
        seed: everything (names, facts, split) is a function of it.
        heldout_fraction: share of countries kept out of SFT (at least one on each side).
    Returns:
        The world, countries sorted by name.
    """
    if num_countries < 2:
        raise ValueError(f"num_countries: at least 2 (one for SFT, one held out), got {num_countries}")
    rng = random.Random(seed)
    used: set[str] = set()
    countries = []
    for _ in range(num_countries):
        names = {kind: _unique_name(rng, kind, used) for kind in SUFFIXES}
        countries.append(Country(names["country"], names["capital"], names["language"], names["currency"]))
    countries.sort(key=lambda c: c.name)
    order = [c.name for c in countries]
    rng.shuffle(order)
    n_heldout = min(max(1, round(num_countries * heldout_fraction)), num_countries - 1)
    return World(seed, tuple(countries), tuple(sorted(order[n_heldout:])), tuple(sorted(order[:n_heldout])))


def _unique_name(rng: random.Random, kind: str, used: set[str]) -> str:
    # Currencies are common nouns ("the dravel"); everything else is a proper name.
    while True:
        syllables = rng.randint(1, 2)
        stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        name = stem + rng.choice(SUFFIXES[kind])
        name = name if kind == "currency" else name.capitalize()
        if len(name) >= 4 and name.lower() not in used:
            used.add(name.lower())
            return name


def corpus_documents(world: World) -> list[str]:
    """Pretraining documents: per country, one paragraph per phrasing index, facts in a seeded order.

    Every fact of every country (held-out ones included) appears in every phrasing.
    """
    rng = random.Random(world.seed + 1)
    docs = []
    for country in world.countries:
        for k in range(len(FACT_PHRASINGS["capital"])):
            sentences = [
                FACT_PHRASINGS[rel][(k + j) % len(FACT_PHRASINGS[rel])].format(
                    country=country.name, value=country.fact(rel))
                for j, rel in enumerate(RELATIONS)
            ]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
    rng.shuffle(docs)
    return docs


def questions(world: World, countries: tuple[str, ...]) -> list[QA]:
    """Every (country, relation, question template) combination for the given countries."""
    rows = []
    for name in countries:
        country = world.by_name(name)
        for rel in RELATIONS:
            for template in QUESTIONS[rel]:
                rows.append(_qa(country, rel, template))
    return rows


def eval_questions(world: World, countries: tuple[str, ...]) -> list[QA]:
    """One question per (country, relation), templates rotating so each is used about equally often."""
    rows = []
    for i, name in enumerate(countries):
        for j, rel in enumerate(RELATIONS):
            template = QUESTIONS[rel][(i + j) % len(QUESTIONS[rel])]
            rows.append(_qa(world.by_name(name), rel, template))
    return rows


def fact_completions(world: World, countries: tuple[str, ...]) -> list[tuple[str, str]]:
    """(prompt, fact) pairs in the corpus's first phrasing, cut before the fact: ("The capital of X is", "Marn").

    They probe what a model knows without the chat format.
    """
    rows = []
    for name in countries:
        country = world.by_name(name)
        for rel in RELATIONS:
            phrasing = FACT_PHRASINGS[rel][0]
            rows.append((phrasing[: phrasing.index(" {value}")].format(country=name), country.fact(rel)))
    return rows


def _qa(country: Country, relation: str, template: str) -> QA:
    value = country.fact(relation)
    answer = ANSWERS[relation].format(country=country.name, value=value)
    return QA(country.name, relation, template.format(country=country.name), answer, value)


def write_world(world: World, data_dir: Path) -> dict[str, Path]:
    """Write the world's files (same seed -> same bytes) and return their paths by role.

    Files: world.json (the facts and the split), corpus.jsonl ({"text"} rows), sft.jsonl ({"messages"} rows,
    SFT countries only, seeded order), eval_heldout.jsonl and eval_sft.jsonl (question, answer, country,
    relation).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    sft_rows = [qa.messages() for qa in questions(world, world.sft_countries)]
    random.Random(world.seed + 2).shuffle(sft_rows)
    paths = {
        "world": _write_json(data_dir / "world.json", _world_dict(world)),
        "corpus": _write_jsonl(data_dir / "corpus.jsonl", [{"text": d} for d in corpus_documents(world)]),
        "sft": _write_jsonl(data_dir / "sft.jsonl", [{"messages": m} for m in sft_rows]),
        "eval_heldout": _write_jsonl(data_dir / "eval_heldout.jsonl",
                                     [asdict(qa) for qa in eval_questions(world, world.heldout_countries)]),
        "eval_sft": _write_jsonl(data_dir / "eval_sft.jsonl",
                                 [asdict(qa) for qa in eval_questions(world, world.sft_countries)]),
    }
    return paths


def read_questions(path: Path) -> list[QA]:
    """The QA rows of an evaluation file written by `write_world`."""
    return [QA(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def _world_dict(world: World) -> dict:
    return {
        "seed": world.seed,
        "countries": [asdict(c) for c in world.countries],
        "sft_countries": list(world.sft_countries),
        "heldout_countries": list(world.heldout_countries),
    }


def _write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return path
