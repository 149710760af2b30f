"""The embedded demo: its synthetic world's facts, the evaluation helpers it uses, and one small end-to-end run.
(The world's files themselves: tests/test_world.py.)"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import encode_chat
from tunesmith.demo import evaluate as ev
from tunesmith.demo.files import WorldSize, write_world
from tunesmith.demo.run import (
    MARKER,
    RECIPE_ROOT,
    DemoSize,
    claim_output_dir,
    demo_config,
    run_demo,
)
from tunesmith.demo.tiny import build_model, train_tokenizer
from tunesmith.demo.world import QA, QUESTIONS, make_world, read_questions
from tunesmith.errors import TunesmithError
from tunesmith.eval.generate import generate_greedy, greedy_token_ids, prompt_ids
from tunesmith.data.answers import exact_match, normalize_answer
from tunesmith.eval.metrics import exact_match_rate


# ---------------------------------------------------------------------------------------------------
# World


def test_names_are_distinct_and_split_is_a_partition():
    world = make_world(seed=0, num_countries=48)
    names = [n.lower() for c in world.countries for n in (c.name, c.capital, c.language, c.currency)]
    assert len(set(names)) == len(names) == 4 * 48
    assert not set(world.sft_countries) & set(world.heldout_countries)
    assert set(world.sft_countries) | set(world.heldout_countries) == {c.name for c in world.countries}
    assert len(world.heldout_countries) == round(48 * 0.3)


TINY_WORLD = WorldSize(stories=6, reviews=8, arithmetic_quizzes=4, fact_quizzes=4, region_quizzes=4,
                       heldout_documents=6, sentiment=(12, 6), extraction=(12, 6), arithmetic_test=8, nli=9)


def test_sft_data_never_mentions_a_heldout_country_or_its_facts(tmp_path):
    world = make_world(seed=0, num_countries=48)
    paths = write_world(world, tmp_path, TINY_WORLD)
    sft_text = paths["sft"].read_text() + paths["qa_train"].read_text()
    for name in world.heldout_countries:
        country = world.by_name(name)
        for word in (country.name, country.capital, country.language, country.currency):
            assert not re.search(rf"\b{re.escape(word)}\b", sft_text), word
    assert {qa.country for qa in read_questions(paths["eval_heldout"])} == set(world.heldout_countries)


def test_corpus_never_asks_the_evaluated_questions_about_a_heldout_country(tmp_path):
    world = make_world(seed=0, num_countries=12)
    corpus = write_world(world, tmp_path, TINY_WORLD)["corpus"].read_text()
    for name in world.heldout_countries:
        for templates in QUESTIONS.values():
            assert not any(t.format(country=name) in corpus for t in templates)
        country = world.by_name(name)
        for value in (country.capital, country.language, country.currency):
            assert value in corpus  # stated, never asked


def test_eval_answers_state_the_fact(tmp_path):
    world = make_world(seed=0, num_countries=12)
    rows = read_questions(write_world(world, tmp_path, TINY_WORLD)["eval_heldout"])
    assert len(rows) == 3 * len(world.heldout_countries)
    for qa in rows:
        assert qa.answer.endswith(f" {qa.fact}.") and qa.country in qa.answer
        assert qa.fact == world.by_name(qa.country).fact(qa.relation)


# ---------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The capital of X is Marn.", "the capital of x is marn", True),
    ("  The  capital\tof X\nis Marn. ", "The capital of X is Marn.", True),
    ("Marn!?", "marn", True),
    ("MARN", "Marn.", True),
    ("Marnburg", "Marn", False),
    ("Marn is", "Marn", False),
    ("", "", True),
])
def test_exact_match_normalises_case_space_and_trailing_punctuation(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


@pytest.mark.parametrize("prediction, ending, expected", [
    ("Tonvik.", "Tonvik.", True),
    ("The capital of Zarnia is Tonvik.", "Tonvik.", True),
    ("People in Zarnia speak  TULISH", "Tulish.", True),
    ("The capital of Zarnia is Tonvikburg.", "Tonvik.", False),
    ("Tonvik is the capital of Zarnia.", "Tonvik.", False),
    ("", "Tonvik.", False),
    ("anything", "", False),
])
def test_a_completion_counts_when_the_answer_ends_with_the_missing_words(prediction, ending, expected):
    assert ev.ends_with(prediction, ending) is expected


def test_normalize_answer_keeps_inner_punctuation():
    assert normalize_answer("  St. Marn, the city. ") == "st. marn, the city"


def test_exact_match_rate():
    assert exact_match_rate(["a", "b.", "c"], ["A", "b", "x"]) == pytest.approx(2 / 3)
    assert exact_match_rate([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match_rate(["a"], [])


# ---------------------------------------------------------------------------------------------------
# Generation


CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus three?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello world, this is a test"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "4"}],
]


@pytest.fixture()
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)  # the session fixture has no template, and other tests rely on that
    install_template(tok, "chatml")
    return tok


def _manual_greedy(model, ids: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: one unpadded sequence, a full forward pass per token, argmax of the last position."""
    new = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + new])).logits[0, -1]  # (V,)
        token = int(logits.argmax())
        if token in stops:
            break
        new.append(token)
    return new


def test_prompt_ids_equal_the_chat_template_and_the_training_prompt(chat_tokenizer):
    for conv in CONVERSATIONS:
        ids = prompt_ids(chat_tokenizer, conv)
        assert ids == chat_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
        full, labels = encode_chat(chat_tokenizer, conv + [{"role": "assistant", "content": "It is five."}])
        assert full[: len(ids)] == ids and labels[len(ids)] != -100 and labels[len(ids) - 1] == -100


@torch.no_grad()
def test_batched_greedy_matches_a_manual_argmax_loop(chat_tokenizer):
    model = build_model("llama", vocab_size=len(chat_tokenizer), seed=0).eval()
    prompts = [prompt_ids(chat_tokenizer, c) for c in CONVERSATIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding is exercised
    # A stop id the model actually produces, so stopping (and cutting the padded rows) is tested too.
    free_run = _manual_greedy(model, prompts[0], [], 6)
    stops = [chat_tokenizer.eos_token_id, free_run[3]]
    model.generation_config.eos_token_id = stops

    got = greedy_token_ids(model, prompts, chat_tokenizer.pad_token_id, max_new_tokens=6)

    expected = [_manual_greedy(model, p, stops, 6) for p in prompts]
    assert got == expected
    assert len(got[0]) <= 3
    texts = generate_greedy(model, chat_tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2)
    assert texts == [chat_tokenizer.decode(e, skip_special_tokens=True) for e in expected]


@torch.no_grad()
def test_preference_scores_are_the_answers_log_probs_after_the_chat_prompt(chat_tokenizer):
    """Each pair's scores equal log p(answer + end of turn | chat prompt) summed token by token, unbatched."""
    model = build_model("llama", vocab_size=len(chat_tokenizer), seed=0).eval()
    pairs = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "It is probably six.", "kind": "wrong_sum"},
             {"prompt": "Capital of Marnburg?", "chosen": "Tellin.", "rejected": "Osk", "kind": "wrong_fact"}]

    rows = ev.score_preferences(model, chat_tokenizer, pairs, batch_size=3)  # a batch boundary inside a pair

    user = lambda p: [{"role": "user", "content": p["prompt"]}]  # noqa: E731
    for pair, row in zip(pairs, rows):
        prompt = prompt_ids(chat_tokenizer, user(pair))
        for answer in ("chosen", "rejected"):
            ids, labels = encode_chat(chat_tokenizer, user(pair) + [{"role": "assistant", "content": pair[answer]}])
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            expected = sum(logps[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)) if labels[t] != -100)
            assert row[f"{answer}_logp"] == pytest.approx(expected, abs=2e-4)
        assert row["correct"] == (row["chosen_logp"] > row["rejected_logp"]) and row["kind"] == pair["kind"]


# ---------------------------------------------------------------------------------------------------
# The demo run


def test_output_dir_is_claimed_only_when_empty_or_an_earlier_demo(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="not written by `tunesmith demo`"):
        claim_output_dir(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"

    demo = claim_output_dir(tmp_path / "demo")
    (demo / "old-run").mkdir()
    claim_output_dir(demo)
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]


def test_demo_configs_keep_the_yaml_settings_and_move_the_run_paths(tmp_path):
    cfg = demo_config("sft_lora.yaml", tmp_path, 7)
    assert cfg.strategy.name == "lora" and cfg.data.template == "chatml" and cfg.train.objective == "sft"
    assert cfg.model.name_or_path == str(tmp_path / "pretrain" / "final")
    assert {s.task for s in cfg.data.train} == {"qa", "arithmetic", "sentiment", "extraction", "paraphrase",
                                                "completion", "nli"}
    assert all(s.path.startswith(str(tmp_path / "data" / "tasks")) for s in cfg.data.train)
    assert cfg.data.instruct.held_out_clusters == ["completion", "nli"]
    assert cfg.train.output_dir == str(tmp_path / "sft") and cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.train.seed == 7 and cfg.train.max_steps == 600
    cfg = demo_config("pretrain.yaml", tmp_path, 0, max_steps=5)
    assert cfg.strategy.name == "full" and cfg.train.objective == "clm" and cfg.train.max_steps == 5
    assert cfg.model.name_or_path == str(tmp_path / "base-init") and cfg.data.train == [str(tmp_path / "data" /
                                                                                            "corpus.jsonl")]
    # `make demo` writes where the recipes say: the default output directory moves nothing
    assert demo_config("pretrain.yaml", Path(RECIPE_ROOT), 0).data.train == [f"{RECIPE_ROOT}/data/corpus.jsonl"]


def _qa(country: str, question: str, value: str) -> QA:
    return QA(country, "capital", question.format(country=country), f"The capital of {country} is {value}.", value)


def test_few_shot_prompts_show_the_same_question_about_other_countries():
    pool = [_qa(c, "What is the capital of {country}?", c + "burg") for c in ("Aland", "Bland", "Cland")]
    pool.append(_qa("Dland", "Name the capital city of {country}.", "Dburg"))
    item = _qa("Xland", "What is the capital of {country}?", "Xburg")
    zero, = ev.qa_prompts([item], pool, 0, seed=0)
    assert zero.prompt == "Q: What is the capital of Xland?\nA:" and zero.references == (item.answer,)
    two, = ev.qa_prompts([item], pool, 2, seed=0)
    lines = two.prompt.split("\n")
    assert len(lines) == 6 and lines[-2:] == ["Q: What is the capital of Xland?", "A:"]
    shown = [line for line in lines[:4] if line.startswith("A: ")]
    assert len(shown) == 2 and all(s[3:] in {p.answer for p in pool[:3]} for s in shown)  # never Dland's wording
    assert ev.qa_prompts([item], pool, 2, seed=0) == [two]
    with pytest.raises(ValueError, match="4 exemplars"):
        ev.qa_prompts([item], pool, 4, seed=0)


def test_scoring_cuts_a_plain_continuation_at_its_first_line(tokenizer, monkeypatch):
    """A base model goes on writing: its answer is the continuation up to the stop string."""
    continuations = [" The capital of X is Y.\nQ: next", " z.\n", " Y"]
    monkeypatch.setattr(ev, "complete_greedy", lambda model, tok, texts, n: continuations)
    prompts = [ev.Prompt("Q: a\nA:", ("The capital of X is Y.",)), ev.Prompt("Q: b\nA:", ("Z",)),
               ev.Prompt("Q: c\nA:", ("The capital of X is Y.",))]
    rows = ev.score_completions(None, tokenizer, prompts)
    assert [r["prediction"] for r in rows] == ["The capital of X is Y.", "z.", "Y"]
    assert [r["correct"] for r in rows] == [True, True, False] and ev.accuracy(rows) == pytest.approx(2 / 3)


def test_bare_names_keep_a_name_s_tokens_after_a_space_and_a_newline():
    tok = train_tokenizer(["The capital of Marnburg is Tonvik. 7 plus 5 is 12."] * 20, vocab_size=300,
                          bare_names=True)
    inside = tok("is Tonvik", add_special_tokens=False)["input_ids"]
    alone = tok("\nTonvik", add_special_tokens=False)["input_ids"]
    assert inside[-len(alone) + 1:] == alone[1:]  # the same ids for "Tonvik", after " " or after "\n"
    assert tok.decode(tok("The capital of Marnburg is 12.")["input_ids"]) == "The capital of Marnburg is 12."


SMALL = DemoSize(num_countries=24, hidden_size=64, num_layers=2, pretrain_steps=800, sft_steps=300, dpo_steps=40)


@pytest.mark.slow
def test_small_demo_shows_each_effect_in_its_direction(tmp_path, capsys):
    report = run_demo(tmp_path / "demo", seed=0, size=SMALL)

    prompting, clusters = report["prompting"], report["clusters"]
    assert prompting["few_shot"]["exact_match"] > prompting["zero_shot"]["exact_match"], prompting
    assert report["seen_clusters"]["tuned"] >= report["seen_clusters"]["base"] + 0.30, report["seen_clusters"]
    # Held out: sentence completion, a task type tuning never showed, about countries it never named.
    completion = {name: scores["completion"] for name, scores in clusters.items()}
    assert completion["base"]["n"] >= 40, completion
    assert completion["tuned"]["exact_match"] >= completion["base"]["exact_match"] + 0.10, completion
    assert completion["tuned"]["exact_match"] > report["heldout_clusters"]["completion"]["chance"], completion
    assert clusters["base"]["fact_completion"]["exact_match"] > 0.5  # the base does know the facts
    forgetting = report["forgetting"]  # as numbers
    assert 1.0 < forgetting["base"] < forgetting["tuned"] and forgetting["aligned"] > 1.0
    alignment = report["alignment"]
    assert alignment["aligned"]["margin"] > alignment["tuned"]["margin"], alignment  # DPO widens the margin
    assert alignment["aligned"]["n"] == len(ev.read_jsonl(tmp_path / "demo" / "data" / "preference" / "heldout.jsonl"))

    written = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert written["clusters"] == clusters and written["seed"] == 0
    assert written["versions"]["torch"] == torch.__version__
    assert written["configs"]["sft"]["strategy"]["name"] == "lora"
    assert written["configs"]["dpo"]["train"]["objective"] == "dpo"
    assert written["configs"]["dpo"]["model"]["name_or_path"] == str(tmp_path / "demo" / "sft-merged")
    assert all((tmp_path / "demo" / run / "loss.png").is_file() for run in ("pretrain", "sft", "dpo"))
    markdown = (tmp_path / "demo" / "report.md").read_text()
    assert "| base + LoRA instruction tuning | chat, zero-shot |" in markdown
    assert "| tuned + DPO (LoRA) | chat, zero-shot |" in markdown
    assert "| base (pretrained) | plain text, zero-shot |" in capsys.readouterr().out
    # The numbers come from the generations in the report, not from anywhere else.
    answers = written["answers"]["clusters"]["tuned"]["qa"]
    assert clusters["tuned"]["qa"]["exact_match"] == pytest.approx(
        sum(exact_match(a["prediction"], a["reference"]) for a in answers) / len(answers))
    completions = ev.read_jsonl(tmp_path / "demo" / "data" / "tasks" / "completion.jsonl")
    answers = written["answers"]["clusters"]["tuned"]["completion"]
    assert clusters["tuned"]["completion"]["exact_match"] == pytest.approx(
        sum(ev.ends_with(a["prediction"], r["ending"]) for a, r in zip(answers, completions)) / len(answers))
    pairs = written["answers"]["preferences"]["aligned"]
    assert alignment["aligned"]["preferred"] == pytest.approx(
        sum(p["chosen_logp"] > p["rejected_logp"] for p in pairs) / len(pairs))
    assert alignment["aligned"]["margin"] == pytest.approx(
        sum(p["chosen_logp"] - p["rejected_logp"] for p in pairs) / len(pairs), abs=1e-3)
