"""Labelled task records and preference data made from the synthetic world.

Records carry exactly the fields the built-in task types need (`tunesmith/data/instruct_templates/*.yaml`),
so the data pipeline renders them through the FLAN-style templates (`data.train: [{path, task}]`):

    task            cluster     fields                       train / test
    qa              qa          question, answer             SFT countries / held-out countries
    arithmetic      math        question, answer, reasoning  asked sums / unasked sums
    sentiment       sentiment   text, label                  fresh reviews, disjoint
    extraction      extraction  text, field, value           invented places / held-out countries
    paraphrase      paraphrase  text, paraphrase             SFT countries / held-out countries
    completion      completion  text, ending                 held out whole: evaluation only
    nli             nli         premise, hypothesis, label   held out whole: evaluation only

The held-out completion cluster (FLAN's sentence completion) gives the beginning of a corpus sentence about a
held-out country ("Complete the sentence: The capital of Zarnia is") and expects its end ("Tonvik."). The base
model knows every such ending (it read each sentence in pretraining) but has never met an instruction; the
tuned model has met instructions, never these: no completion template, no held-out country's fact is in its
training data. What the cluster measures is whether answering instructions carries over to a task type tuning
never showed. Two seen clusters meet it halfway, and the report says so: paraphrase answers a corpus sentence
about a country (value included) with the QA cluster's wording of its fact, and QA recalls a held-out country's
fact from a question. Completion gives a corpus sentence without its value, and the tuned model mostly
answers with a QA-style sentence ("People in Zarnia speak Tulish."), so an answer counts when it ends with the
missing ending (`evaluate.ends_with`); the strict exact match (the ending alone or the completed sentence) is
reported beside it.

Why NLI can be answered at all by a model that never trained on it: its templates end in an options block
("OPTIONS:\n- yes\n- it is not possible to tell\n- no") and its hypotheses state country facts, and the QA
cluster trains yes/no questions that check a claimed fact, half of them with a yes/no options block in FLAN's
format. What transfers is answering a claim about a fact with yes or no; the "it is not possible to tell"
third never does at this scale.

Preference pairs (prompt, chosen, rejected, kind) contrast a correct answer with a plausible wrong one (another
country's capital; a sum off by one) and a concise answer with a rambling one; pairs about held-out countries
and unasked sums are kept apart for measuring preference rates. Unpaired rows (prompt, completion, label) for
KTO come from the training pairs.
"""

from __future__ import annotations

import random
from typing import Any

from tunesmith.demo.texts import Review, Sum
from tunesmith.demo.world import (
    ANSWERS,
    FACT_PHRASINGS,
    QA,
    RELATIONS,
    Country,
    World,
    eval_questions,
    invent_country,
    questions,
)

SEEN_TASKS = ("qa", "arithmetic", "sentiment", "extraction", "paraphrase")
HELDOUT_TASKS = ("completion", "nli")  # held out whole; the first is the demo's main held-out cluster
HELDOUT_TASK = HELDOUT_TASKS[0]
NLI_LABELS = ("entailment", "neutral", "contradiction")

Record = dict[str, Any]


def qa_records(rows: list[QA]) -> list[Record]:
    """Fact questions answered by a sentence that states the fact (see `world.ANSWERS` for why a sentence)."""
    return [{"question": qa.question, "answer": qa.answer} for qa in rows]


def qa_split(world: World, rng: random.Random) -> tuple[list[Record], list[Record]]:
    """Train: every question template about the SFT countries, and a yes/no question per fact of theirs (true
    or, as often, naming another country's value). Test: one question per held-out fact."""
    train = qa_records(questions(world, world.sft_countries)) + yes_no_records(world, world.sft_countries, rng)
    return train, qa_records(eval_questions(world, world.heldout_countries))


YES_NO_QUESTIONS = {"capital": "Is {value} the capital of {country}?",
                    "language": "Do people in {country} speak {value}?",
                    "currency": "Is the {value} the currency of {country}?"}


YES_NO_OPTIONS = "\nOPTIONS:\n- yes\n- no"  # FLAN's options block, as the NLI templates render theirs


def yes_no_records(world: World, countries: tuple[str, ...], rng: random.Random) -> list[Record]:
    """Questions that check a claimed fact, answered yes or no (half of them listing the two options): fact
    checking, the skill nearest to NLI."""
    records = []
    for name in countries:
        for relation in RELATIONS:
            true = rng.random() < 0.5
            other = _other_country(world, name, rng, countries)
            value = world.by_name(name).fact(relation) if true else other.fact(relation)
            question = YES_NO_QUESTIONS[relation].format(country=name, value=value)
            records.append({"question": question + (YES_NO_OPTIONS if rng.random() < 0.5 else ""),
                            "answer": "yes" if true else "no"})
    return records


SUM_QUESTIONS = ("What is {left} {op} {right}?", "How much is {left} {op} {right}?", "Calculate {left} {op} {right}.",
                 "What do you get from {left} {op} {right}?")


def arithmetic_records(sums: list[Sum], rng: random.Random) -> list[Record]:
    """One question per sum; the answer is the number, the reasoning the corpus's statement of the sum."""
    return [{"question": rng.choice(SUM_QUESTIONS).format(left=s.left, op=s.op, right=s.right),
             "answer": str(s.result), "reasoning": s.statement()} for s in sums]


def sentiment_records(reviews: list[Review]) -> list[Record]:
    return [{"text": r.text, "label": r.label} for r in reviews]


# (text, fields it mentions); slots: name, city, country, language, currency.
EXTRACTION_TEXTS = (
    ("{name} took the night train to {city} and stayed for a week.", ("city", "person")),
    ("At the market in {city}, {name} paid with the {currency}.", ("city", "currency", "person")),
    ("{name} is learning {language} before a trip to {country}.", ("language", "country", "person")),
    ("The bank in {city} changes any money into the {currency}.", ("city", "currency")),
    ("{name} wrote a letter in {language} to a friend in {city}.", ("language", "city", "person")),
    ("A teacher from {country} gave {name} a book written in {language}.", ("country", "language", "person")),
    ("{name} moved to {city} last spring and found work in a bakery.", ("city", "person")),
    ("The old coins of {country} were melted down to make the {currency}.", ("country", "currency")),
)
FIELD_SLOTS = {"city": "city", "country": "country", "language": "language", "currency": "currency", "person": "name"}


def extraction_records(places: list[Country], names: list[str], rng: random.Random, count: int) -> list[Record]:
    """Sentences about the given places and people, each with one mentioned thing to pull out (field, value)."""
    records = []
    for _ in range(count):
        text, fields = rng.choice(EXTRACTION_TEXTS)
        slots = _slots(rng.choice(places), rng.choice(names))
        field = rng.choice(fields)
        records.append({"text": text.format(**slots), "field": field, "value": slots[FIELD_SLOTS[field]]})
    return records


def invented_places(world: World, rng: random.Random, count: int) -> tuple[list[Country], list[str]]:
    """`count` countries and person names invented afresh: training records about them can only be answered by
    copying from the text, never from memory, so tuning teaches extraction rather than a list of names."""
    used = {n.lower() for c in world.countries for n in (c.name, c.capital, c.language, c.currency)}
    places = [invent_country(rng, used) for _ in range(count)]
    return places, [p.name.removesuffix("ia") + "o" for p in places]


def nli_records(world: World, rng: random.Random, count: int) -> list[Record]:
    """Premise: a fact about a country. Hypothesis: the same fact in other words (entailment), another
    country's value for it (contradiction), or another fact of the country (neutral). Labels balanced."""
    labels = [NLI_LABELS[i % len(NLI_LABELS)] for i in range(count)]
    rng.shuffle(labels)
    records = []
    for label in labels:
        country = rng.choice(world.countries)
        relation, other = rng.sample(RELATIONS, 2)
        premise = rng.choice(FACT_PHRASINGS[relation]).format(country=country.name, value=country.fact(relation))
        if label == "entailment":
            hypothesis = ANSWERS[relation].format(country=country.name, value=country.fact(relation))
        elif label == "contradiction":
            wrong = _other_country(world, country.name, rng).fact(relation)
            hypothesis = ANSWERS[relation].format(country=country.name, value=wrong)
        else:
            hypothesis = ANSWERS[other].format(country=country.name, value=country.fact(other))
        records.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return records


def paraphrase_records(world: World, countries: tuple[str, ...], every_phrasing: bool = True) -> list[Record]:
    """Corpus sentences stating a fact of the given countries, each reworded as the QA cluster answers ("Tonvik
    is the capital city of Zarnia." -> "The capital of Zarnia is Tonvik."). Every phrasing that differs from
    that answer, or (`every_phrasing=False`, the test split) one per fact, phrasings rotating."""
    records = []
    for i, name in enumerate(countries):
        country = world.by_name(name)
        for j, relation in enumerate(RELATIONS):
            answer = ANSWERS[relation].format(country=name, value=country.fact(relation))
            texts = [p.format(country=name, value=country.fact(relation)) for p in FACT_PHRASINGS[relation]]
            texts = [t for t in texts if t != answer]
            for text in texts if every_phrasing else [texts[(i + j) % len(texts)]]:
                records.append({"text": text, "paraphrase": answer})
    return records


def completion_records(world: World, countries: tuple[str, ...]) -> list[Record]:
    """Every corpus sentence about the given countries that ends on a fact, cut before the fact: {"text": "The
    capital of Zarnia is", "ending": "Tonvik."}, one record per (country, phrasing)."""
    records = []
    for name in countries:
        country = world.by_name(name)
        for relation in RELATIONS:
            for phrasing in FACT_PHRASINGS[relation]:
                if phrasing.endswith(" {value}."):
                    records.append({"text": phrasing.removesuffix(" {value}.").format(country=name),
                                    "ending": f"{country.fact(relation)}."})
    return records


def _slots(country: Country, name: str) -> dict[str, str]:
    return {"name": name, "city": country.capital, "country": country.name, "language": country.language,
            "currency": country.currency}


# ---------------------------------------------------------------------------------------------------
# Preferences

RAMBLING = ("Well, that is a good question, and people ask it a lot. {country} is a country with a long "
            "history. There is much one could say, and "
            "I could go on for a long time. To answer you: {answer} I hope this helps, and do ask again if you "
            "want to know more.")


def preference_pairs(world: World, countries: tuple[str, ...], sums: list[Sum], rng: random.Random
                     ) -> list[Record]:
    """Per (country, relation): a correct answer over another country's fact ("wrong_fact") and the concise
    answer over a rambling one ("rambling"); per sum: the result over a result off by one ("wrong_sum")."""
    pairs = []
    for qa in eval_questions(world, countries):
        wrong = _other_country(world, qa.country, rng, countries).fact(qa.relation)
        wrong_answer = ANSWERS[qa.relation].format(country=qa.country, value=wrong)
        pairs.append({"prompt": qa.question, "chosen": qa.answer, "rejected": wrong_answer, "kind": "wrong_fact"})
        # the rambling pair asks the same fact in another wording, so the two kinds of pair share no prompt
        question = rng.choice([q for q in questions(world, (qa.country,))
                               if q.relation == qa.relation and q.question != qa.question])
        rambling = RAMBLING.format(country=qa.country, answer=question.answer)
        pairs.append({"prompt": question.question, "chosen": question.answer, "rejected": rambling,
                      "kind": "rambling"})
    for s in sums:
        off = s.result + rng.choice((-1, 1))
        question = rng.choice(SUM_QUESTIONS).format(left=s.left, op=s.op, right=s.right)
        pairs.append({"prompt": question, "chosen": str(s.result), "rejected": str(off), "kind": "wrong_sum"})
    return pairs


def _other_country(world: World, name: str, rng: random.Random, among: tuple[str, ...] | None = None) -> Country:
    """Another country, from `among` when given (so SFT data never names a held-out country's facts)."""
    return world.by_name(rng.choice([n for n in among or [c.name for c in world.countries] if n != name]))


def unpaired_rows(pairs: list[Record]) -> list[Record]:
    """KTO's unpaired form: each pair's chosen answer as desirable, its rejected one as undesirable (rows that
    repeat an earlier (prompt, completion) are left out)."""
    rows, seen = [], set()
    for pair in pairs:
        for completion, desirable in ((pair["chosen"], True), (pair["rejected"], False)):
            if (pair["prompt"], completion) not in seen:
                seen.add((pair["prompt"], completion))
                rows.append({"prompt": pair["prompt"], "completion": completion, "label": desirable})
    return rows
