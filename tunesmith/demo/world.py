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
from dataclasses import dataclass
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

# Quiz pages in the corpus ask the SFT countries' facts, never a held-out country's. A page keeps one answer
# wording for all its questions and pages differ, so a question alone does not say how its answer is worded
# (the first wording is `ANSWERS`', the one evaluation expects); the page's earlier answers do: what few-shot
# examples give the base model and a zero-shot prompt does not. Every wording restates the country, so a page
# also shows the model how to carry a question's country into its answer.
QUIZ_ANSWERS = {
    "capital": ("The capital of {country} is {value}.", "In {country}, the capital is {value}.",
                "{country} has its capital in {value}.", "For {country}, the answer is {value}.",
                "{country}: the capital is {value}."),
    "language": ("People in {country} speak {value}.", "In {country}, the language is {value}.",
                 "{country} has {value} as its language.", "For {country}, the answer is {value}.",
                 "{country}: the language is {value}."),
    "currency": ("The currency of {country} is the {value}.", "In {country}, the money is the {value}.",
                 "{country} has the {value} as its money.", "For {country}, the answer is the {value}.",
                 "{country}: the money is the {value}."),
}


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


def invent_country(rng: random.Random, used: set[str]) -> Country:
    """A country with fresh names (not in `used`, which gains them), for data that must not be answerable
    from memory."""
    names = {kind: _unique_name(rng, kind, used) for kind in SUFFIXES}
    return Country(names["country"], names["capital"], names["language"], names["currency"])


def _unique_name(rng: random.Random, kind: str, used: set[str]) -> str:
    # Every name is capitalised, currencies too ("the Dravel"): the demo's tokenizer gives capitalised words the
    # same tokens with and without a space before them (`train_tokenizer(bare_names=True)`).
    while True:
        syllables = rng.randint(1, 2)
        stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        name = (stem + rng.choice(SUFFIXES[kind])).capitalize()
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


def atlas_pages(world: World, rng: random.Random, passes: int = 2, per_page: int = 6) -> list[str]:
    """Pages that list one relation for several countries ("The capital of A is X. The capital of B is Y. ..."),
    each fact once per pass in a seeded grouping and in a rotating phrasing.

    A page holds many facts of one kind, so the model learns to look each one up for its own country instead
    of repeating the one before it: what it needs when a prompt shows it solved examples about other countries.
    """
    pages = []
    for p in range(passes):
        for rel in RELATIONS:
            order = list(world.countries)
            rng.shuffle(order)
            phrasing = FACT_PHRASINGS[rel][p % len(FACT_PHRASINGS[rel])]
            for start in range(0, len(order), per_page):
                pages.append(" ".join(phrasing.format(country=c.name, value=c.fact(rel))
                                      for c in order[start:start + per_page]))
    return pages


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


def fact_quizzes(world: World, countries: tuple[str, ...], rng: random.Random, count: int, per_page: int = 4
                 ) -> list[str]:
    """Quiz pages ("Q: ...\nA: ..." lines) about the given countries: one relation, one question template and
    one answer wording per page."""
    pages = []
    for _ in range(count):
        relation = rng.choice(RELATIONS)
        question, answer = rng.choice(QUESTIONS[relation]), rng.choice(QUIZ_ANSWERS[relation])
        lines = []
        for name in rng.sample(countries, min(per_page, len(countries))):
            value = world.by_name(name).fact(relation)
            lines.append(f"Q: {question.format(country=name)}\nA: {answer.format(country=name, value=value)}")
        pages.append("\n".join(lines))
    return pages


# Where each country lies: a fact asked in quiz pages about every country, held-out ones included, and never
# evaluated. Those pages show the model questions about every country answered by restating that country; the
# facts that are evaluated (capital, language, currency) are asked in quizzes about the SFT countries only.
REGIONS = ("north", "south", "east", "west")
REGION_QUESTIONS = ("In which part of the world is {country}?", "Where does {country} lie?",
                    "Which region is {country} in?")
# the same shapes as `QUIZ_ANSWERS`, so every answer wording is seen restating held-out countries too
REGION_ANSWERS = ("The region of {country} is the {region}.", "In {country}, the region is the {region}.",
                  "{country} has its place in the {region}.", "For {country}, the answer is the {region}.",
                  "{country}: the region is the {region}.")


def region(world: World, name: str) -> str:
    """The region of a country (seeded by world and name, so the countries themselves stay as they were)."""
    return random.Random(f"{world.seed}:region:{name}").choice(REGIONS)


def region_quizzes(world: World, rng: random.Random, count: int, per_page: int = 4) -> list[str]:
    """Quiz pages asking where countries lie (all countries), one question and one answer wording per page."""
    pages = []
    for _ in range(count):
        question, answer = rng.choice(REGION_QUESTIONS), rng.choice(REGION_ANSWERS)
        chosen = rng.sample(world.countries, min(per_page, len(world.countries)))
        pages.append("\n".join(f"Q: {question.format(country=c.name)}\n"
                               f"A: {answer.format(country=c.name, region=region(world, c.name))}" for c in chosen))
    return pages


def _qa(country: Country, relation: str, template: str) -> QA:
    value = country.fact(relation)
    answer = ANSWERS[relation].format(country=country.name, value=value)
    return QA(country.name, relation, template.format(country=country.name), answer, value)


def read_questions(path: Path) -> list[QA]:
    """The QA rows of an evaluation file written by `write_world`."""
    return [QA(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
