"""Corpus documents beyond the country facts: arithmetic, short stories, reviews and quiz pages.

    sums = arithmetic_facts(max_operand=9)              # 7 plus 5 is 12, 12 minus 5 is 7, ...
    asked, unasked = split_sums(sums, seed, 0.25)       # `unasked` sums are stated, never asked, anywhere
    docs = arithmetic_documents(sums, rng) + stories(world, people, rng, 60) + reviews(world, rng, 80)

Quiz pages ("Q: ...\nA: ..." lines) are the corpus's only question-shaped text. They ask about arithmetic and
about the story just told, never about a country's capital, language or currency: the base model meets the
Q/A format but not the questions it is evaluated on, so in-context examples are what show it that task.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tunesmith.demo.world import Country, World

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty")
OPERATORS = {"plus": "+", "minus": "-"}


@dataclass(frozen=True)
class Sum:
    """One arithmetic fact, `left op right = result`, with op "plus" or "minus"."""

    left: int
    op: str
    right: int
    result: int

    def words(self) -> str:
        """"7 plus 5"."""
        return f"{self.left} {self.op} {self.right}"

    def statement(self) -> str:
        """"7 plus 5 is 12." (the form quizzes and worked reasoning use)."""
        return f"{self.words()} is {self.result}."


SUM_PHRASINGS = (
    "{left} {op} {right} is {result}.",
    "{left} {sign} {right} = {result}.",
    "{left_word} {op} {right_word} makes {result_word}.",
)
SUM_HEADINGS = ("Practice sums:", "Arithmetic drill:", "Numbers to remember:", "Homework:")


def arithmetic_facts(max_operand: int = 9) -> list[Sum]:
    """Every `a plus b` with 1 <= a, b <= max_operand, and the subtraction that undoes it (`a+b minus b`)."""
    if not 1 <= max_operand <= len(NUMBER_WORDS) // 2:
        raise ValueError(f"max_operand: between 1 and {len(NUMBER_WORDS) // 2} (sums are spelled out), "
                         f"got {max_operand}")
    pairs = [(a, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)]
    return [Sum(a, "plus", b, a + b) for a, b in pairs] + [Sum(a + b, "minus", b, a) for a, b in pairs]


def split_sums(sums: list[Sum], seed: int, unasked_fraction: float) -> tuple[list[Sum], list[Sum]]:
    """(asked, unasked): unasked sums appear in the corpus only as statements, so a question about one tests
    knowledge from pretraining, the way questions about held-out countries do."""
    order = list(sums)
    random.Random(f"{seed}:sums").shuffle(order)
    n = round(len(order) * unasked_fraction)
    return sorted(order[n:], key=_sum_key), sorted(order[:n], key=_sum_key)


def _sum_key(s: Sum) -> tuple:
    return s.op, s.left, s.right


def sum_sentence(s: Sum, phrasing: str) -> str:
    return phrasing.format(**_sum_slots(s), left_word=NUMBER_WORDS[s.left], right_word=NUMBER_WORDS[s.right],
                           result_word=NUMBER_WORDS[s.result]).capitalize()


def arithmetic_documents(sums: list[Sum], rng: random.Random, per_doc: int = 8) -> list[str]:
    """Worksheets: every sum in every phrasing, shuffled and cut into documents of `per_doc` lines."""
    lines = [sum_sentence(s, p) for s in sums for p in SUM_PHRASINGS]
    rng.shuffle(lines)
    return [rng.choice(SUM_HEADINGS) + "\n" + "\n".join(lines[i:i + per_doc]) for i in range(0, len(lines), per_doc)]


# ---------------------------------------------------------------------------------------------------
# People, stories and their quizzes

PERSON_ONSETS = ("T", "M", "L", "N", "R", "S", "K", "J", "D", "H", "B", "V", "El", "Or", "Is", "Al")
PERSON_MIDDLES = ("om", "ir", "an", "el", "ar", "os", "in", "ul", "ed", "ov")
PERSON_ENDS = ("a", "o", "as", "is", "en", "ie", "et", "us")


def people(world: World, count: int, seed: int) -> list[str]:
    """`count` distinct first names for story characters, none equal to a name in the world."""
    rng = random.Random(f"{seed}:people")
    taken = {n.lower() for c in world.countries for n in (c.name, c.capital, c.language, c.currency)}
    names: list[str] = []
    if count > len(PERSON_ONSETS) * len(PERSON_MIDDLES) * len(PERSON_ENDS) // 2:
        raise ValueError(f"people: at most {len(PERSON_ONSETS) * len(PERSON_MIDDLES) * len(PERSON_ENDS) // 2}")
    while len(names) < count:
        name = rng.choice(PERSON_ONSETS) + rng.choice(PERSON_MIDDLES) + rng.choice(PERSON_ENDS)
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


@dataclass(frozen=True)
class StoryTemplate:
    sentences: tuple[str, ...]
    quiz: tuple[tuple[str, str], ...]  # (question, answer) about the story itself


# Slots: name, friend, city, country, language, currency, and a word problem (few, more, total, left).
STORY_TEMPLATES = (
    StoryTemplate(
        ("{name} grew up in {city}, the capital of {country}.",
         "Every morning {name} bought bread and paid with the {currency}.",
         "One day {name} met {friend}, who spoke only {language}."),
        (("Where did {name} grow up?", "{name} grew up in {city}."),
         ("Who did {name} meet?", "{name} met {friend}."),
         ("Which language did {friend} speak?", "{friend} spoke {language}."))),
    StoryTemplate(
        ("{name} and {friend} walked to the harbour of {city}.",
         "They carried {more} apples and ate {few} of them, so {left} were left.",
         "On the ship everyone spoke {language}."),
        (("Where did {name} and {friend} walk to?", "They walked to the harbour of {city}."),
         ("How many apples were left?", "{left} apples were left."),
         ("What did everyone on the ship speak?", "Everyone on the ship spoke {language}."))),
    StoryTemplate(
        ("{name} kept a small shop in {country}.",
         "On Monday {name} sold {more} lamps and on Tuesday {few} more, {total} in all.",
         "{friend}, who lived in {city}, came to help."),
        (("What did {name} sell?", "{name} sold lamps."),
         ("How many lamps did {name} sell?", "{name} sold {total} lamps."),
         ("Where did {friend} live?", "{friend} lived in {city}."))),
    StoryTemplate(
        ("{friend} wrote a letter in {language} to {name}.",
         "It said that the winter in {city} had been long and cold.",
         "{name} sent back {more} coins of the {currency}."),
        (("Who wrote the letter?", "{friend} wrote the letter."),
         ("In which language was the letter?", "The letter was in {language}."),
         ("How many coins did {name} send?", "{name} sent {more} coins."))),
    StoryTemplate(
        ("In {city}, {name} found a lost dog near the river.",
         "{friend} put up notes in {language} all over {country}.",
         "After {few} days the owner came to take the dog home."),
        (("What did {name} find?", "{name} found a lost dog."),
         ("Who put up the notes?", "{friend} put up the notes."),
         ("How many days passed before the owner came?", "{few} days passed."))),
)


def stories(world: World, names: list[str], rng: random.Random, count: int, quiz_fraction: float = 0.5
            ) -> list[str]:
    """`count` short stories about people in the world's countries; a share of them is followed by a quiz page
    ("Q: ...\nA: ..." lines) about the story."""
    docs = []
    for _ in range(count):
        template = rng.choice(STORY_TEMPLATES)
        slots = _story_slots(rng.choice(world.countries), names, rng)
        text = " ".join(s.format(**slots) for s in template.sentences)
        if rng.random() < quiz_fraction:
            asked = rng.sample(template.quiz, 2)
            text += "\nQuestions:\n" + quiz_lines(
                [(q.format(**slots), a.format(**slots)) for q, a in asked])
        docs.append(text)
    return docs


def _story_slots(country: Country, names: list[str], rng: random.Random) -> dict[str, str | int]:
    name, friend = rng.sample(names, 2)
    few, more = sorted(rng.sample(range(2, 10), 2))
    return {"name": name, "friend": friend, "city": country.capital, "country": country.name,
            "language": country.language, "currency": country.currency,
            "few": few, "more": more, "total": more + few, "left": more - few}


def quiz_lines(pairs: list[tuple[str, str]]) -> str:
    """Question/answer pairs in the corpus's quiz format, which few-shot prompts reuse."""
    return "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)


# Quiz pages about sums: each page draws one question wording and, independently, one answer wording and keeps
# them for all its questions. The question does not tell how the answer is worded; only the page's earlier answers
# do, so the corpus rewards reading a format off the examples before it: in-context learning, at a small scale.
QUIZ_QUESTIONS = ("What is {left} {op} {right}?", "How much is {left} {op} {right}?", "Work out {left} {op} {right}.",
                  "{left} {sign} {right} = ?", "What do you get from {left} {op} {right}?",
                  "Can you tell me {left} {op} {right}?")
QUIZ_ANSWERS = ("{left} {op} {right} is {result}.", "{result}.", "The answer is {result}.",
                "{left} {sign} {right} = {result}.", "You get {result}.", "{left} {op} {right} makes {result}.",
                "It is {result}.", "That is {result}, since {left} {op} {right} is {result}.")


def arithmetic_quizzes(asked: list[Sum], rng: random.Random, count: int, per_page: int = 5) -> list[str]:
    """Quiz pages about the asked sums only, one format per page ("Q: What is 7 plus 5?\nA: It is 12.")."""
    pages = []
    for _ in range(count):
        question, answer = rng.choice(QUIZ_QUESTIONS), rng.choice(QUIZ_ANSWERS)
        pairs = [(question.format(**_sum_slots(s)), answer.format(**_sum_slots(s)))
                 for s in rng.sample(asked, min(per_page, len(asked)))]
        pages.append(quiz_lines(pairs))
    return pages


def _sum_slots(s: Sum) -> dict[str, str | int]:
    return {"left": s.left, "op": s.op, "right": s.right, "result": s.result, "sign": OPERATORS[s.op]}


# ---------------------------------------------------------------------------------------------------
# Reviews

POSITIVE = ("wonderful", "excellent", "lovely", "great", "pleasant", "perfect", "charming", "superb")
NEGATIVE = ("terrible", "awful", "poor", "dreadful", "horrible", "disappointing", "dirty", "miserable")
CLOSINGS = {"positive": ("I would go again.", "Highly recommended.", "Five stars.", "We loved it."),
            "negative": ("Never again.", "Avoid it.", "One star.", "We hated it.")}
REVIEW_TEMPLATES = (
    "I stayed at the hotel in {city}. The room was {adj1} and the breakfast was {adj2}. {closing}",
    "Review of the market in {city}: {adj1} stalls and {adj2} service. {closing}",
    "We took the ferry to {city}. The trip was {adj1} and the crew were {adj2}. {closing}",
    "The museum of {country} in {city} is {adj1}. The guides were {adj2}. {closing}",
    "I bought a coat in {city} and paid with the {currency}. The cloth is {adj1} and the fit is {adj2}. {closing}",
    "Dinner at a small place in {city} was {adj1}. The soup was {adj2}. {closing}",
)
SENTIMENTS = ("negative", "positive")


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # "positive" or "negative"


def reviews(world: World, rng: random.Random, count: int) -> list[Review]:
    """`count` reviews of places in the world, half positive and half negative in a seeded order."""
    labels = [SENTIMENTS[i % 2] for i in range(count)]
    rng.shuffle(labels)
    out = []
    for label in labels:
        words = POSITIVE if label == "positive" else NEGATIVE
        adj1, adj2 = rng.sample(words, 2)
        country = rng.choice(world.countries)
        text = rng.choice(REVIEW_TEMPLATES).format(
            city=country.capital, country=country.name, currency=country.currency, adj1=adj1, adj2=adj2,
            closing=rng.choice(CLOSINGS[label]))
        out.append(Review(text, label))
    return out
