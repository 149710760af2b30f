"""The synthetic world's data files: pretraining corpus, labelled task records, preference data.

    world = make_world(seed=0)
    paths = write_world(world, Path("runs/demo/data"), WorldSize())

Every generator draws from its own RNG, seeded by the world's seed and the generator's name, so the same seed
gives the same bytes and changing one size leaves the other files as they were.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tunesmith.demo import tasks
from tunesmith.demo.texts import (
    arithmetic_documents,
    arithmetic_facts,
    arithmetic_quizzes,
    people,
    reviews,
    split_sums,
    stories,
)
from tunesmith.demo.world import (
    World,
    atlas_pages,
    corpus_documents,
    eval_questions,
    fact_quizzes,
    questions,
    region_quizzes,
)


@dataclass(frozen=True)
class WorldSize:
    """How much of each kind of data the world yields (the countries themselves are `make_world`'s)."""

    max_operand: int = 6  # sums of 1..6 and the subtractions that undo them
    unasked_sum_fraction: float = 0.3  # sums only stated, never asked: the arithmetic test set
    people: int = 24  # story characters
    stories: int = 40
    story_quiz_fraction: float = 0.5  # stories followed by a quiz page about them
    arithmetic_quizzes: int = 30
    atlas_passes: int = 2  # pages listing one relation for several countries: each fact once per pass
    region_quizzes: int = 80  # quiz pages about where every country lies (a fact never evaluated)
    fact_quizzes: int = 30  # quiz pages about the SFT countries' facts (never a held-out country)
    reviews: int = 50
    heldout_documents: int = 40  # unseen stories and reviews, for the forgetting check
    sentiment: tuple[int, int] = (160, 48)  # (train, test) records
    extraction: tuple[int, int] = (160, 48)
    arithmetic_test: int = 48  # at most this many unasked sums are asked in the test split
    nli: int = 60  # a second held-out cluster, evaluation only (completion: every held-out fact)


def write_world(world: World, data_dir: Path, size: WorldSize = WorldSize()) -> dict[str, Path]:
    """Write every file of the world (same seed and size -> same bytes) and return their paths by role.

    Files (JSON lines unless named .json):
        world.json                the countries, the split of countries, the sizes
        corpus.jsonl              {"text"} pretraining documents; corpus_heldout.jsonl: unseen ones
        sft.jsonl                 {"messages"} questions about SFT countries as chat
        eval_heldout/eval_sft     one question per fact of the held-out / SFT countries (QA fields)
        tasks/<task>.train/.test  labelled records for `data.train: [{path, task}]` (see `tasks`)
        tasks/completion.jsonl    the held-out clusters (all evaluation): sentence completion about the
        tasks/nli.jsonl             held-out countries, NLI about every country
        preference/train, heldout {"prompt", "chosen", "rejected", "kind"}; heldout is disjoint from train
        preference/unpaired       {"prompt", "completion", "label"} for KTO, from the training pairs
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    asked, unasked = split_sums(arithmetic_facts(size.max_operand), world.seed, size.unasked_sum_fraction)
    names = people(world, size.people, world.seed)
    sft_rows = [qa.messages() for qa in questions(world, world.sft_countries)]
    _rng(world, "sft").shuffle(sft_rows)
    paths = {
        "world": _write_json(data_dir / "world.json", {**_world_dict(world), "size": asdict(size)}),
        "corpus": _write_texts(data_dir / "corpus.jsonl", corpus(world, size, asked, unasked, names)),
        "corpus_heldout": _write_texts(data_dir / "corpus_heldout.jsonl", heldout_corpus(world, size, names)),
        "sft": _write_jsonl(data_dir / "sft.jsonl", [{"messages": m} for m in sft_rows]),
        "eval_heldout": _write_jsonl(data_dir / "eval_heldout.jsonl",
                                     [asdict(qa) for qa in eval_questions(world, world.heldout_countries)]),
        "eval_sft": _write_jsonl(data_dir / "eval_sft.jsonl",
                                 [asdict(qa) for qa in eval_questions(world, world.sft_countries)]),
    }
    for task, (train, test) in task_splits(world, size, asked, unasked, names).items():
        paths[f"{task}_train"] = _write_jsonl(data_dir / "tasks" / f"{task}.train.jsonl", train)
        paths[f"{task}_test"] = _write_jsonl(data_dir / "tasks" / f"{task}.test.jsonl", test)
    paths["completion"] = _write_jsonl(data_dir / "tasks" / "completion.jsonl",
                                       tasks.completion_records(world, world.heldout_countries))
    paths["nli"] = _write_jsonl(data_dir / "tasks" / "nli.jsonl",
                                tasks.nli_records(world, _rng(world, "nli"), size.nli))
    paths.update(_write_preferences(world, data_dir / "preference", asked, unasked))
    return paths


def corpus(world: World, size: WorldSize, asked, unasked, names: list[str]) -> list[str]:
    """The pretraining documents, shuffled: facts, arithmetic worksheets and quizzes, stories, reviews."""
    docs = corpus_documents(world) + atlas_pages(world, _rng(world, "atlas"), size.atlas_passes)
    docs += arithmetic_documents(asked + unasked, _rng(world, "worksheets"))
    docs += arithmetic_quizzes(asked, _rng(world, "quizzes"), size.arithmetic_quizzes)
    docs += fact_quizzes(world, world.sft_countries, _rng(world, "fact-quizzes"), size.fact_quizzes)
    docs += region_quizzes(world, _rng(world, "region-quizzes"), size.region_quizzes)
    docs += stories(world, names, _rng(world, "stories"), size.stories, size.story_quiz_fraction)
    docs += [r.text for r in reviews(world, _rng(world, "reviews"), size.reviews)]
    _rng(world, "corpus").shuffle(docs)
    return docs


def heldout_corpus(world: World, size: WorldSize, names: list[str]) -> list[str]:
    """Documents of the corpus's kinds that pretraining never saw (new stories and reviews), for measuring
    forgetting on text like the pretraining text rather than on the text itself."""
    n = size.heldout_documents
    docs = stories(world, names, _rng(world, "heldout-stories"), n // 2, quiz_fraction=0.0)
    docs += [r.text for r in reviews(world, _rng(world, "heldout-reviews"), n - n // 2)]
    return docs


def task_splits(world: World, size: WorldSize, asked, unasked, names: list[str]
                ) -> dict[str, tuple[list[dict], list[dict]]]:
    """(train, test) records of each seen task; a test record never equals a training one."""
    n_train, n_test = size.sentiment
    all_reviews = reviews(world, _rng(world, "sentiment"), n_train + 2 * n_test)
    train_texts = {r.text for r in all_reviews[:n_train]}
    sentiment_train = tasks.sentiment_records(all_reviews[:n_train])
    sentiment_test = tasks.sentiment_records([r for r in all_reviews[n_train:] if r.text not in train_texts][:n_test])
    arithmetic_rng = _rng(world, "arithmetic")
    return {
        "qa": tasks.qa_split(world, _rng(world, "yes-no")),
        "arithmetic": (tasks.arithmetic_records(asked, arithmetic_rng),
                       tasks.arithmetic_records(unasked[:size.arithmetic_test], arithmetic_rng)),
        "sentiment": (sentiment_train, sentiment_test),
        "extraction": (
            tasks.extraction_records(*tasks.invented_places(world, _rng(world, "invent"), size.extraction[0]),
                                     _rng(world, "extract"), size.extraction[0]),
            tasks.extraction_records([world.by_name(n) for n in world.heldout_countries], names,
                                     _rng(world, "extract-test"), size.extraction[1])),
        "paraphrase": (tasks.paraphrase_records(world, world.sft_countries),
                       tasks.paraphrase_records(world, world.heldout_countries, every_phrasing=False)),
    }


def _write_preferences(world: World, directory: Path, asked, unasked) -> dict[str, Path]:
    train = tasks.preference_pairs(world, world.sft_countries, asked, _rng(world, "preference"))
    heldout = tasks.preference_pairs(world, world.heldout_countries, unasked, _rng(world, "preference-heldout"))
    return {
        "preference_train": _write_jsonl(directory / "train.jsonl", train),
        "preference_heldout": _write_jsonl(directory / "heldout.jsonl", heldout),
        "unpaired_train": _write_jsonl(directory / "unpaired.jsonl", tasks.unpaired_rows(train)),
    }


def _rng(world: World, name: str) -> random.Random:
    return random.Random(f"{world.seed}:{name}")


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


def _write_texts(path: Path, texts: list[str]) -> Path:
    return _write_jsonl(path, [{"text": t} for t in texts])


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return path
