"""The real-model quickstart (`tunesmith demo --real`): its question sets are well formed, the held-out questions
are nowhere in the training rows, the scorer counts whole words, the config passes tunesmith's own checks, the
table renders; and (slow) the whole quickstart reaches its targets on SmolLM2-135M-Instruct."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from tunesmith.cli import build_parser
from tunesmith.export import llama_cpp
from tunesmith.demo.real import EVALUATED_GENERAL, SCORER, Recipe, real_config, run_real_demo
from tunesmith.demo.real_data import (
    HELDOUT_QUESTIONS,
    TRAIN_QUESTIONS,
    contains_answer,
    facts,
    heldout_rows,
    training_rows,
    write_data,
)
from tunesmith.demo.real_report import format_table, wrong_answers
from tunesmith.demo.real_world_questions import GENERAL_TEXT, REAL_WORLD_QUESTIONS
from tunesmith.demo.world import RELATIONS, make_world
from tunesmith.eval.command import eval_sets
from tunesmith.eval.metrics import load_scorer


def _user_turns(rows: list[dict]) -> list[str]:
    return [row["messages"][0]["content"] for row in rows]


# ---------------------------------------------------------------------------------------------------
# Question sets


def test_real_world_questions_are_well_formed():
    questions = [q for q, _ in REAL_WORLD_QUESTIONS]
    assert len(questions) >= 30 and len(set(questions)) == len(questions)
    for question, answers in REAL_WORLD_QUESTIONS:
        assert question.endswith("?") and question == question.strip()
        assert answers and all(a and a == a.strip() and "|" not in a for a in answers)
        assert all(len(a.split()) <= 3 for a in answers), (question, answers)  # short, clear answers


def test_general_text_is_a_few_plain_paragraphs():
    assert 5 <= len(GENERAL_TEXT) <= 20
    assert all(30 <= len(p.split()) <= 120 for p in GENERAL_TEXT)
    assert len(set(GENERAL_TEXT)) == len(GENERAL_TEXT)


def test_templates_name_the_country_once_and_heldout_ones_are_new():
    for relation in RELATIONS:
        for template in TRAIN_QUESTIONS[relation] + HELDOUT_QUESTIONS[relation]:
            assert template.count("{country}") == 1, template
        assert not set(HELDOUT_QUESTIONS[relation]) & set(TRAIN_QUESTIONS[relation])


@pytest.mark.parametrize("paraphrases", [1, 8, len(TRAIN_QUESTIONS["capital"])])
def test_heldout_questions_are_not_verbatim_in_the_training_rows(paraphrases):
    world = make_world(seed=0, num_countries=8)
    train_text = json.dumps(training_rows(world, paraphrases))
    heldout = heldout_rows(world)
    for question in _user_turns(heldout):
        assert question not in train_text
    # nor any held-out template with another country's name in it
    stems = {re.sub(r"\{country\}.*", "", t) for ts in HELDOUT_QUESTIONS.values() for t in ts}
    assert not {s for s in stems if s and s in train_text}


def test_every_fact_is_taught_and_asked_once():
    world = make_world(seed=3, num_countries=5)
    rows, heldout = training_rows(world, 4), heldout_rows(world)
    answers = " ".join(row["messages"][1]["content"] for row in rows)
    every = facts(world)
    assert len(every) == 15 and len(heldout) == len(every)
    assert len(rows) == 15 * 4 + 5 * 2  # paraphrases per fact, two profiles per country
    for fact, row in zip(every, heldout):
        assert re.search(rf"\b{fact.value}\b", answers)
        assert fact.country in row["messages"][0]["content"]
        assert row["messages"][1]["content"] == fact.value


def test_paraphrases_out_of_range_are_refused():
    world = make_world(seed=0, num_countries=2)
    with pytest.raises(ValueError, match="paraphrases"):
        training_rows(world, 0)
    with pytest.raises(ValueError, match="paraphrases"):
        training_rows(world, len(TRAIN_QUESTIONS["capital"]) + 1)


# ---------------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("prediction, reference, want", [
    ("The capital of Zarnia is Tonvik.", "Tonvik", 1.0),
    ("The capital of Zarnia is Tonvikburg.", "Tonvik", 0.0),
    ("TONVIK", "Tonvik", 1.0),
    ("The answer to this classic math problem is 4.", "4|four", 1.0),
    ("A square has four sides.", "4|four", 1.0),
    ("The square root of 9 is approximately 3.09.", "3|three", 0.0),
    ("It is 34.", "4|four", 0.0),
    ("The boiling point of water is approximately 100.0 degrees Celsius.", "100", 1.0),
    ("Version 1.4 of it", "4", 0.0),
    ("The currency of Japan is the Japanese Yen (JPY).", "yen", 1.0),
    ("Leonardo da Vinci painted it.", "Leonardo da Vinci|da Vinci", 1.0),
    ("", "Tonvik", 0.0),
])
def test_contains_answer_counts_whole_words(prediction, reference, want):
    assert contains_answer(prediction, reference) == want


def test_the_scorer_loads_as_eval_sets_load_it():
    assert load_scorer(SCORER) is contains_answer


# ---------------------------------------------------------------------------------------------------
# Config, CLI, table


def test_config_passes_tunesmiths_checks(tmp_path):
    world = make_world(seed=0, num_countries=4)
    paths = write_data(world, tmp_path / "data", 2)
    cfg = real_config(paths, tmp_path, seed=0, recipe=Recipe())
    sets = {s.name: s for s in eval_sets(cfg)}
    assert set(sets) == {"heldout", "real_world", "general_text"}
    # Training guards the general text only (seconds per score); the comparison also reports the real world.
    assert sets["general_text"].general and not sets["real_world"].general and not sets["heldout"].general
    compared = {s.name: s for s in eval_sets(real_config(paths, tmp_path, 0, Recipe(), EVALUATED_GENERAL))}
    assert compared["real_world"].general and compared["general_text"].general and not compared["heldout"].general
    assert cfg.strategy.name == "lora" and cfg.train.seed == 0 and cfg.model.name_or_path == "smollm2-135m-instruct"
    lines = paths["real_world"].read_text().splitlines()
    assert len(lines) == len(REAL_WORLD_QUESTIONS)


def test_cli_takes_demo_real():
    args = build_parser().parse_args(["demo", "--real", "--seed", "3"])
    assert args.real and args.seed == 3 and args.output_dir is None


def fake_report(with_llama: bool = True) -> dict:
    rows = [{"model": "base", "runtime": "transformers", "heldout": 0.0, "real_world": 1.0, "perplexity": 9.876},
            {"model": "tuned", "runtime": "transformers", "heldout": 0.875, "real_world": 0.9565,
             "perplexity": 10.5}]
    if with_llama:
        rows.append({"model": "tuned, GGUF", "runtime": "llama.cpp", "heldout": 0.8333, "real_world": 0.9348,
                     "perplexity": None})
    wrong = {"question": "What is the capital of Zarnia?", "reference": "Tonvik", "prediction": "Marn.",
             "correct": False}
    return {"rows": rows, "counts": {"heldout": 24, "real_world": 46, "general_text": 8},
            "recipe": {"gguf_quant": "q8_0"}, "timings": {"train": 300.0, "evaluate": 100.4}, "wall_s": 612.0,
            "load_average": [2.0, 2.51, 3.0], "cpu_count": 2,
            "answers": {"tuned": {"heldout": [wrong], "real_world": []}, "base": {"heldout": [wrong]}}}


def test_table_renders_every_row_and_the_timing():
    table = format_table(fake_report())
    lines = table.splitlines()
    assert lines[0].startswith("| model | runs in | invented countries, held-out questions (24) |")
    assert lines[2] == "| SmolLM2-135M-Instruct (base) | transformers | 0.0% | 100.0% | 9.88 |"
    assert lines[3] == "| + LoRA on the invented countries | transformers | 87.5% | 95.7% | 10.50 |"
    assert lines[4] == "| + LoRA, merged, GGUF q8_0 | llama.cpp | 83.3% | 93.5% | - |"
    assert "Wall time 10.2 min (train 300 s, evaluate 100 s) on 2 CPU cores; load average at the end 2.0, 2.5, 3.0" \
        in table


def test_table_without_llama_cpp_says_how_to_get_it():
    assert "make llama-cpp" in format_table(fake_report(with_llama=False))


def test_wrong_answers_list_the_tuned_models_mistakes_not_the_bases_guesses():
    text = wrong_answers(fake_report())
    assert "tuned, invented countries, held-out questions: 1 wrong of 1" in text
    assert "base" not in text


# ---------------------------------------------------------------------------------------------------
# The whole quickstart


@pytest.mark.slow
def test_the_quickstart_teaches_the_facts_and_keeps_real_knowledge(smollm2_dir, tmp_path):
    """The quickstart's target, with seed 0: the held-out questions go from about 0% to at least 80%, and at least
    90% of the real-world answers stay right (~11 min on 2 CPU cores, llama.cpp's answers included where it is
    built). Measured: 88.9% and 93.5% with one thread and with two (docs/PERFORMANCE.md, "The real-model
    quickstart")."""
    report = run_real_demo(tmp_path / "demo-real", seed=0)
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["base"]["heldout"] <= 0.1 and rows["base"]["real_world"] >= 0.95
    assert rows["tuned"]["heldout"] >= 0.8 and rows["tuned"]["real_world"] >= 0.9
    if llama_cpp.find() is not None:  # the merged GGUF answers in llama.cpp (measured: 88.9% and 91.3%)
        assert rows["tuned, GGUF"]["heldout"] >= 0.8
    assert (tmp_path / "demo-real" / "results.md").read_text().startswith("# Real-model quickstart")
    assert json.loads((tmp_path / "demo-real" / "results.json").read_text())["rows"] == report["rows"]


def test_trials_script_reads_recipe_fields_as_their_types():
    from conftest import load_benchmark

    trials = load_benchmark("demo_real_trials")
    recipe = trials.parse_recipe(["lr=1e-3", "epochs=4", r"target_modules=.*\.mlp\.down_proj"])
    assert recipe == dataclasses.replace(Recipe(), lr=1e-3, epochs=4, target_modules=r".*\.mlp\.down_proj")
    with pytest.raises(SystemExit, match="expected FIELD=VALUE with FIELD one of num_countries"):
        trials.parse_recipe(["learning_rate=1"])


def test_trials_script_scales_the_adapter_between_base_and_tuned_and_restores_it():
    """`--scales`: scale 0 is the base model's logits, 2 doubles the update, and the adapter is as trained after."""
    from peft import LoraConfig, get_peft_model

    from conftest import load_benchmark
    from tunesmith.demo.tiny import build_model

    trials = load_benchmark("demo_real_trials")
    torch.manual_seed(0)
    model = get_peft_model(build_model("llama", vocab_size=64), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                            target_modules=["q_proj", "down_proj"]))
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        with trials.scaled_adapter(model, 0.0):
            assert torch.allclose(model(ids).logits, base, atol=1e-6)
        with trials.scaled_adapter(model, 2.0):
            doubled = model(ids).logits
        assert torch.equal(model(ids).logits, tuned)
    assert not torch.allclose(base, tuned, atol=1e-3) and not torch.allclose(doubled, tuned, atol=1e-3)
