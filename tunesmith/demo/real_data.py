"""The real-model quickstart's data: facts about the demo world's invented countries, taught to SmolLM2 in
paraphrased questions and asked back in phrasings training never shows; plus the files its eval sets read.

    facts       every (country, relation) of `make_world(seed, num_countries)`: capital, language, currency
    train       per fact `paraphrases` questions from TRAIN_QUESTIONS, answered in rotating ANSWER_WORDINGS,
                plus one profile per country ("Tell me about Zarnia." -> all three facts in one answer)
    held out    per fact one question from HELDOUT_QUESTIONS (templates rotating): no such question, template
                or verbatim string is in the training rows (tests/test_demo_real.py checks it)

The names are made of invented syllables, so a model can only know a fact from the training rows; the base
model's score on the held-out questions is a guess's (about 0%).

Every eval set is a chat conversation whose last assistant turn is the reference: the accepted answers joined
by "|" ("Tonvik", "4|four"), scored by `contains_answer`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tunesmith.demo.real_world_questions import GENERAL_TEXT, REAL_WORLD_QUESTIONS
from tunesmith.demo.world import RELATIONS, Country, World

# Training phrasings, per relation. The first four are the tiny demo's own (`world.QUESTIONS`).
TRAIN_QUESTIONS = {
    "capital": (
        "What is the capital of {country}?",
        "Which city is the capital of {country}?",
        "Name the capital city of {country}.",
        "Where does the government of {country} sit?",
        "What city is the capital of {country}?",
        "Tell me the capital of {country}.",
        "{country} has its capital in which city?",
        "What is {country}'s capital?",
        "In which city is the capital of {country}?",
        "Do you know the capital of {country}?",
        "Capital of {country}?",
        "I am writing about {country}. Which city is its capital?",
    ),
    "language": (
        "What language do people speak in {country}?",
        "Which language is spoken in {country}?",
        "Name the main language of {country}.",
        "In which language do children in {country} learn to read?",
        "What language is spoken in {country}?",
        "What do people in {country} speak?",
        "Tell me the language of {country}.",
        "What is the official language of {country}?",
        "Which language do people use in {country}?",
        "Do you know the language of {country}?",
        "Language of {country}?",
        "I am writing about {country}. Which language is spoken there?",
    ),
    "currency": (
        "What is the currency of {country}?",
        "Which money is used in {country}?",
        "Name the currency people pay with in {country}.",
        "In what currency do shops in {country} set their prices?",
        "What money do people use in {country}?",
        "Tell me the currency of {country}.",
        "What is the official currency of {country}?",
        "What do people in {country} pay with?",
        "Which currency is used in {country}?",
        "Do you know the currency of {country}?",
        "Currency of {country}?",
        "I am writing about {country}. Which currency is used there?",
    ),
}

# Asked in evaluation only: phrasings that no training row uses.
HELDOUT_QUESTIONS = {
    "capital": (
        "What's the name of the capital city of {country}?",
        "If I fly to the capital of {country}, which city do I land in?",
        "Which city is the seat of government in {country}?",
    ),
    "language": (
        "If I move to {country}, which language should I learn?",
        "What's the main language you hear in {country}?",
        "Which language would a newspaper in {country} be written in?",
    ),
    "currency": (
        "If I travel to {country}, which money should I bring?",
        "What's the name of the money people spend in {country}?",
        "Which currency would I need to buy bread in {country}?",
    ),
}

ANSWER_WORDINGS = {
    "capital": ("The capital of {country} is {value}.", "{value} is the capital of {country}.",
                "{country}'s capital is {value}.", "The capital city of {country} is {value}."),
    "language": ("People in {country} speak {value}.", "The language of {country} is {value}.",
                 "In {country}, people speak {value}.", "{value} is the main language of {country}."),
    "currency": ("The currency of {country} is the {value}.", "People in {country} pay with the {value}.",
                 "{country} uses the {value} as its money.", "The money of {country} is the {value}."),
}

PROFILE_QUESTIONS = ("Tell me about {country}.", "What do you know about {country}?")
PROFILE_ANSWER = ("{country} is a country whose capital is {capital}. People there speak {language} and pay with "
                  "the {currency}.")


@dataclass(frozen=True)
class Fact:
    """One thing to learn: a relation's value for a country."""

    country: str
    relation: str
    value: str


def facts(world: World) -> list[Fact]:
    """Every (country, relation) of the world, countries in name order."""
    return [Fact(c.name, rel, c.fact(rel)) for c in world.countries for rel in RELATIONS]


def chat(question: str, answer: str) -> dict:
    """A training or eval row in tunesmith's `messages` format."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def training_rows(world: World, paraphrases: int) -> list[dict]:
    """Per fact the first `paraphrases` TRAIN_QUESTIONS, answers rotating through ANSWER_WORDINGS; then the
    country profiles. In a fixed order (the training loop shuffles with its seed)."""
    if not 1 <= paraphrases <= min(map(len, TRAIN_QUESTIONS.values())):
        raise ValueError(f"paraphrases: 1 to {min(map(len, TRAIN_QUESTIONS.values()))}, got {paraphrases}")
    rows = []
    for i, fact in enumerate(facts(world)):
        for k, template in enumerate(TRAIN_QUESTIONS[fact.relation][:paraphrases]):
            wordings = ANSWER_WORDINGS[fact.relation]
            answer = wordings[(i + k) % len(wordings)].format(country=fact.country, value=fact.value)
            rows.append(chat(template.format(country=fact.country), answer))
    for country in world.countries:
        for question in PROFILE_QUESTIONS:
            rows.append(chat(question.format(country=country.name), profile(country)))
    return rows


def profile(country: Country) -> str:
    return PROFILE_ANSWER.format(country=country.name, capital=country.capital, language=country.language,
                                 currency=country.currency)


def heldout_rows(world: World) -> list[dict]:
    """One held-out question per fact, templates rotating; the reference is the fact's value."""
    rows = []
    for i, fact in enumerate(facts(world)):
        templates = HELDOUT_QUESTIONS[fact.relation]
        rows.append(chat(templates[i % len(templates)].format(country=fact.country), fact.value))
    return rows


def real_world_rows() -> list[dict]:
    """The fixed real-world questions, each referenced by its accepted answers joined by "|"."""
    return [chat(question, "|".join(answers)) for question, answers in REAL_WORLD_QUESTIONS]


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w]|\.\d)")


def contains_answer(prediction: str, reference: str) -> float:
    """1.0 when one of the accepted answers ("|"-separated) occurs in the prediction as whole words, ignoring
    case, a number as a number of the same value: "Tonvik" is in "The capital of Zarnia is Tonvik." but not in
    "Tonvikburg"; "100" is in "100.0 degrees", "3" is not in "3.09" nor in "34".

    An eval-set scorer (`scorer: tunesmith.demo.real_data:contains_answer`): the base model answers in
    sentences of its own wording, so an exact match would count right answers as wrong.
    """
    text = prediction.casefold()
    numbers = {float(n) for n in _NUMBER.findall(text)}
    for answer in (a.strip().casefold() for a in reference.split("|")):
        if _NUMBER.fullmatch(answer):
            found = float(answer) in numbers
        else:
            found = bool(answer) and re.search(r"(?<![\w.])" + re.escape(answer) + r"(?!\w)", text) is not None
        if found:
            return 1.0
    return 0.0


def first_sentence(text: str) -> str | None:
    """The answer's first sentence, up to its first line break ("3 + 5 = 8\n\nThis is ..." -> "3 + 5 = 8");
    None when it has no end (a sentence cut by the token limit)."""
    line = text.strip().split("\n", 1)[0].strip()
    found = re.match(r".+?[.!?](?=\s|$)", line)
    if found:
        return found.group(0)
    return line if line and "\n" in text.strip() else None


def write_data(world: World, data_dir: Path, paraphrases: int, replay: list[dict] = ()) -> dict[str, Path]:
    """Write the training rows (the invented countries' in train.jsonl, the `replay` rows in replay.jsonl) and the
    three eval sets; returns their paths by role (train, replay, heldout, real_world, general_text) plus
    world.json (the countries and their facts)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    countries = [{"name": c.name, **{rel: c.fact(rel) for rel in RELATIONS}} for c in world.countries]
    (data_dir / "world.json").write_text(json.dumps({"seed": world.seed, "countries": countries}, indent=2) + "\n",
                                         encoding="utf-8")
    return {
        "world": data_dir / "world.json",
        "train": _write_jsonl(data_dir / "train.jsonl", training_rows(world, paraphrases)),
        "replay": _write_jsonl(data_dir / "replay.jsonl", list(replay)),
        "heldout": _write_jsonl(data_dir / "heldout.jsonl", heldout_rows(world)),
        "real_world": _write_jsonl(data_dir / "real_world.jsonl", real_world_rows()),
        "general_text": _write_jsonl(data_dir / "general_text.jsonl", [{"text": t} for t in GENERAL_TEXT]),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return path
