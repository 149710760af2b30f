"""The synthetic world's files: deterministic, sized as asked, rendered by the built-in templates through the data
pipeline, preference rows in the preference format, held-out data disjoint from training data."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace

import pytest

from tunesmith.data.formats import load_rows
from tunesmith.data.templates import install_template
from tunesmith.data.pipeline import InstructOptions, Options, Source, prepare
from tunesmith.demo.files import WorldSize, write_world
from tunesmith.demo.tasks import HELDOUT_TASKS, NLI_LABELS, SEEN_TASKS
from tunesmith.demo.texts import arithmetic_facts, split_sums
from tunesmith.demo.world import ANSWERS, FACT_PHRASINGS, QUESTIONS, REGION_QUESTIONS, make_world, read_questions

SMALL = WorldSize(stories=6, reviews=8, arithmetic_quizzes=4, fact_quizzes=4, region_quizzes=4, heldout_documents=6,
                  sentiment=(12, 6), extraction=(12, 6), arithmetic_test=8, nli=9)


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_bytes(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)  # the session fixture has no template, and other tests rely on that
    install_template(tok, "chatml")
    return tok


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    world = make_world(seed=0, num_countries=12)
    return world, write_world(world, tmp_path_factory.mktemp("world"), SMALL)


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_world(make_world(seed=seed, num_countries=12), tmp_path / name, SMALL)
    a, b, c = (_all_bytes(tmp_path / d) for d in "abc")
    assert len(a) == 21 and a == b
    assert all(a[name] != c[name] for name in a), [name for name in a if a[name] == c[name]]


def test_one_size_changes_only_its_own_files(tmp_path):
    world = make_world(seed=0, num_countries=12)
    write_world(world, tmp_path / "a", SMALL)
    write_world(world, tmp_path / "b", replace(SMALL, sentiment=(20, 6)))
    a, b = _all_bytes(tmp_path / "a"), _all_bytes(tmp_path / "b")
    assert {name for name in a if a[name] != b[name]} == {"world.json", "tasks/sentiment.train.jsonl",
                                                           "tasks/sentiment.test.jsonl"}


def test_sizes_are_honoured(world_files):
    world, paths = world_files
    counts = {role: len(_read(path)) for role, path in paths.items() if path.suffix == ".jsonl"}
    asked, unasked = split_sums(arithmetic_facts(SMALL.max_operand), 0, SMALL.unasked_sum_fraction)
    assert (counts["sentiment_train"], counts["sentiment_test"]) == SMALL.sentiment
    assert (counts["extraction_train"], counts["extraction_test"]) == SMALL.extraction
    assert counts["nli"] == SMALL.nli
    assert counts["completion"] == len(world.heldout_countries) * 7  # every phrasing that ends on the fact
    assert counts["paraphrase_test"] == len(world.heldout_countries) * 3
    assert (counts["arithmetic_train"], counts["arithmetic_test"]) == (len(asked), SMALL.arithmetic_test)
    assert counts["qa_train"] == len(world.sft_countries) * 3 * (4 + 1)  # every question template, yes/no
    assert counts["qa_test"] == counts["eval_heldout"] == len(world.heldout_countries) * 3
    assert counts["corpus_heldout"] == SMALL.heldout_documents
    assert len(asked) + len(unasked) == 2 * SMALL.max_operand ** 2


def test_corpus_kinds_and_no_evaluated_question_about_a_heldout_country(world_files):
    world, paths = world_files
    corpus = "\n".join(row["text"] for row in _read(paths["corpus"]))
    for country in world.countries:
        for value in (country.capital, country.language, country.currency):
            assert value in corpus
    assert re.search(r"\b\d+ plus \d+ is \d+\.", corpus) and re.search(r"\b\d+ - \d+ = \d+\.", corpus)
    assert "\nQuestions:\nQ: " in corpus
    assert any(word in corpus for word in ("wonderful", "terrible", "lovely", "awful"))
    questions = [line[3:] for line in corpus.splitlines() if line.startswith("Q: ")]
    regions = {t.format(country=c.name) for t in REGION_QUESTIONS for c in world.countries}
    assert questions and set(questions) & regions
    for name in world.heldout_countries:  # asked where it lies, never for a fact that is evaluated
        assert all(q in regions for q in questions if name in q), name


def test_every_task_file_renders_through_the_builtin_templates(world_files, chat_tokenizer):
    """The pipeline reads each file as records of its task, renders every one with a template and tokenises
    it; the held-out cluster goes to the test split whole."""
    world, paths = world_files
    sources = [Source(str(paths[f"{task}_{split}"]), task=task) for task in SEEN_TASKS for split in ("train", "test")]
    sources += [Source(str(paths[task]), task=task) for task in HELDOUT_TASKS]
    options = Options(max_seq_len=512, instruct=InstructOptions(held_out_clusters=HELDOUT_TASKS))
    prepared = prepare(chat_tokenizer, {"train": sources}, options)
    rows = sum(len(_read(paths[f"{t}_{s}"])) for t in SEEN_TASKS for s in ("train", "test"))
    assert prepared.report["splits"]["train"]["examples"] == rows
    held_out = sum(len(_read(paths[task])) for task in HELDOUT_TASKS)
    assert prepared.report["splits"]["test"]["examples"] == held_out
    assert prepared.report["held_out_clusters"]["rows"] == held_out
    assert prepared.report["splits"]["train"]["truncated"] == 0


def test_records_hold_the_fields_their_task_needs(world_files):
    world, paths = world_files
    heldout_values = {v for n in world.heldout_countries for v in (n, world.by_name(n).capital,
                                                                   world.by_name(n).language,
                                                                   world.by_name(n).currency)}
    for row in _read(paths["extraction_test"]):
        assert row["value"] in row["text"]
        assert row["field"] == "person" or row["value"] in heldout_values
    world_names = {v.lower() for c in world.countries for v in (c.name, c.capital, c.language, c.currency)}
    for row in _read(paths["extraction_train"]):  # invented names: answerable only by copying
        assert row["value"] in row["text"] and row["value"].lower() not in world_names
    for row in _read(paths["arithmetic_train"]):
        left, op, right = re.match(r"\D*(\d+) (plus|minus) (\d+)", row["question"]).groups()
        assert int(row["answer"]) == (int(left) + int(right) if op == "plus" else int(left) - int(right))
        assert row["reasoning"].endswith(f"is {row['answer']}.")
    labels = [row["label"] for row in _read(paths["nli"])]
    assert set(labels) == set(NLI_LABELS) and len({labels.count(x) for x in labels}) == 1
    for row in _read(paths["nli"]):
        claim_true = row["hypothesis"].rstrip(".").split()[-1] in row["premise"]
        assert claim_true == (row["label"] == "entailment")
    assert {row["label"] for row in _read(paths["sentiment_train"])} == {"positive", "negative"}
    yes_no = [row for row in _read(paths["qa_train"]) if row["answer"] in ("yes", "no")]
    assert len(yes_no) == 3 * len(world.sft_countries) and {r["answer"] for r in yes_no} == {"yes", "no"}


def test_test_records_never_appear_in_training(world_files):
    _, paths = world_files
    for task in SEEN_TASKS:
        train = {json.dumps(r, sort_keys=True) for r in _read(paths[f"{task}_train"])}
        assert not any(json.dumps(r, sort_keys=True) in train for r in _read(paths[f"{task}_test"])), task
    asked_questions = {r["question"] for r in _read(paths["arithmetic_train"])}
    corpus = "\n".join(row["text"] for row in _read(paths["corpus"]))
    for row in _read(paths["arithmetic_test"]):
        sum_words = re.match(r"\D*(\d+ (?:plus|minus) \d+)", row["question"]).group(1)
        assert f"{sum_words} is {row['answer']}." in corpus  # stated in pretraining
        assert not any(q.endswith(f" {sum_words}?") for q in asked_questions)
        assert f"Q: What is {sum_words}?" not in corpus  # never asked there


def test_preference_rows_load_and_heldout_pairs_are_disjoint(world_files):
    world, paths = world_files
    train = load_rows(paths["preference_train"], "preference")
    heldout = load_rows(paths["preference_heldout"], "preference")
    assert all(r.kind == "preference" and r.chosen != r.rejected for r in train + heldout)
    assert not {r.messages[-1]["content"] for r in train} & {r.messages[-1]["content"] for r in heldout}
    kinds = {row["kind"] for row in _read(paths["preference_train"])}
    assert kinds == {"wrong_fact", "rambling", "wrong_sum"}
    for row in _read(paths["preference_heldout"]):
        if row["kind"] != "wrong_sum":
            assert any(name in row["prompt"] for name in world.heldout_countries)
    unpaired = load_rows(paths["unpaired_train"], "unpaired")
    assert {r.desirable for r in unpaired} == {True, False}
    assert len(unpaired) == len({(r.messages[-1]["content"], r.completion) for r in unpaired})


def test_wrong_facts_are_another_countrys_and_rambling_is_longer(world_files):
    world, paths = world_files
    values = {c.capital for c in world.countries} | {c.language for c in world.countries} | \
        {c.currency for c in world.countries}
    for row in _read(paths["preference_train"]):
        if row["kind"] == "wrong_fact":
            wrong = row["rejected"].rstrip(".").split()[-1]
            assert wrong in values and wrong not in row["chosen"]
        elif row["kind"] == "rambling":
            assert row["chosen"] in row["rejected"] and len(row["rejected"]) > 3 * len(row["chosen"])


def test_eval_questions_are_the_heldout_countries_facts(world_files):
    world, paths = world_files
    rows = read_questions(paths["eval_heldout"])
    assert {qa.country for qa in rows} == set(world.heldout_countries)
    for qa in rows:
        assert qa.fact == world.by_name(qa.country).fact(qa.relation) and qa.answer.endswith(f" {qa.fact}.")
        assert any(qa.question == t.format(country=qa.country) for t in QUESTIONS[qa.relation])


def test_completion_records_are_corpus_sentences_about_heldout_countries_cut_before_the_fact(world_files):
    world, paths = world_files
    corpus = "\n".join(row["text"] for row in _read(paths["corpus"]))
    facts = {(n, world.by_name(n).fact(rel)) for n in world.heldout_countries for rel in ANSWERS}
    for row in _read(paths["completion"]):
        assert f"{row['text']} {row['ending']}" in corpus  # the base model read the whole sentence
        country = next(n for n in world.heldout_countries if n in row["text"])
        assert (country, row["ending"].removesuffix(".")) in facts and row["ending"] not in row["text"]


def test_paraphrases_reword_a_corpus_sentence_as_the_qa_answer(world_files):
    world, paths = world_files
    phrasings = [p for ps in FACT_PHRASINGS.values() for p in ps]
    for split, countries in (("train", world.sft_countries), ("test", world.heldout_countries)):
        for row in _read(paths[f"paraphrase_{split}"]):
            assert row["text"] != row["paraphrase"] and any(n in row["text"] for n in countries)
            assert row["paraphrase"].rstrip(".").split()[-1] in row["text"]  # the same fact, other words
            assert any(re.fullmatch(re.escape(p).replace(r"\{country\}", ".+").replace(r"\{value\}", ".+"),
                                    row["text"]) for p in phrasings)


def test_sft_data_never_holds_a_heldout_instruction_or_fact(world_files, chat_tokenizer):
    """What the pipeline trains on: no completion or NLI template, no held-out country."""
    from tunesmith.data.instruct import builtin_tasks

    world, paths = world_files
    sources = [Source(str(paths[f"{task}_train"]), task=task) for task in SEEN_TASKS]
    sources += [Source(str(paths[task]), task=task) for task in HELDOUT_TASKS]
    options = Options(max_seq_len=512, instruct=InstructOptions(held_out_clusters=HELDOUT_TASKS))
    train = chat_tokenizer.decode([t for ex in prepare(chat_tokenizer, {"train": sources}, options).splits["train"]
                                   for t in ex.input_ids])
    for task in HELDOUT_TASKS:
        for template in builtin_tasks()[task].templates:
            # the instruction's own words before its first field and after its last one
            for words in (template.prompt.split("{{")[0].strip(), template.prompt.split("}}")[-1].strip()):
                if len(words) > 8:
                    assert words not in train, (task, template.id, words)
    for name in world.heldout_countries:
        assert name not in train
