"""The embedded demo: its synthetic world, the evaluation helpers it uses, and one small end-to-end run."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import encode_chat
from tunesmith.demo.run import MARKER, DemoSize, claim_output_dir, demo_config, run_demo, run_overrides
from tunesmith.demo.tiny import build_model
from tunesmith.demo.world import QUESTIONS, make_world, read_questions, write_world
from tunesmith.errors import TunesmithError
from tunesmith.eval.generate import generate_greedy, greedy_token_ids, prompt_ids
from tunesmith.eval.metrics import exact_match, exact_match_rate, normalize_answer


# ---------------------------------------------------------------------------------------------------
# World


def _file_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_world_files_are_deterministic(tmp_path):
    write_world(make_world(seed=0, num_countries=12), tmp_path / "a")
    write_world(make_world(seed=0, num_countries=12), tmp_path / "b")
    write_world(make_world(seed=1, num_countries=12), tmp_path / "c")
    a, b, c = (_file_bytes(tmp_path / d) for d in "abc")
    assert set(a) == {"world.json", "corpus.jsonl", "sft.jsonl", "eval_heldout.jsonl", "eval_sft.jsonl"}
    assert a == b
    assert all(a[name] != c[name] for name in a)


def test_names_are_distinct_and_split_is_a_partition():
    world = make_world(seed=0, num_countries=48)
    names = [n.lower() for c in world.countries for n in (c.name, c.capital, c.language, c.currency)]
    assert len(set(names)) == len(names) == 4 * 48
    assert not set(world.sft_countries) & set(world.heldout_countries)
    assert set(world.sft_countries) | set(world.heldout_countries) == {c.name for c in world.countries}
    assert len(world.heldout_countries) == round(48 * 0.3)


def test_sft_data_never_mentions_a_heldout_country_or_its_facts(tmp_path):
    world = make_world(seed=0, num_countries=48)
    paths = write_world(world, tmp_path)
    sft_text = paths["sft"].read_text()
    for name in world.heldout_countries:
        country = world.by_name(name)
        for word in (country.name, country.capital, country.language, country.currency):
            assert not re.search(rf"\b{re.escape(word)}\b", sft_text), word
    assert {qa.country for qa in read_questions(paths["eval_heldout"])} == set(world.heldout_countries)


def test_corpus_states_every_fact_and_asks_no_question(tmp_path):
    world = make_world(seed=0, num_countries=12)
    corpus = write_world(world, tmp_path)["corpus"].read_text()
    for country in world.countries:
        for value in (country.capital, country.language, country.currency):
            assert f"{value}" in corpus
    assert "?" not in corpus
    assert not any(t.format(country="")[:12] in corpus for templates in QUESTIONS.values() for t in templates)


def test_eval_answers_state_the_fact(tmp_path):
    world = make_world(seed=0, num_countries=12)
    rows = read_questions(write_world(world, tmp_path)["eval_heldout"])
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


def test_demo_configs_keep_the_yaml_settings_and_take_the_run_paths(tmp_path):
    cfg = demo_config("sft_lora.yaml", run_overrides(tmp_path / "base", tmp_path / "sft.jsonl", tmp_path / "sft", 7,
                                                     None))
    assert cfg.strategy.name == "lora" and cfg.data.template == "chatml" and cfg.train.objective == "sft"
    assert cfg.model.name_or_path == str(tmp_path / "base") and cfg.data.train == [str(tmp_path / "sft.jsonl")]
    assert cfg.train.output_dir == str(tmp_path / "sft") and cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.train.seed == 7 and cfg.train.max_steps == 100
    cfg = demo_config("pretrain.yaml", run_overrides(tmp_path / "init", tmp_path / "c.jsonl", tmp_path / "pt", 0, 5))
    assert cfg.strategy.name == "full" and cfg.train.objective == "clm" and cfg.train.max_steps == 5


SMALL = DemoSize(num_countries=24, hidden_size=64, num_layers=2, pretrain_steps=150, sft_steps=60)


def test_small_demo_raises_heldout_exact_match(tmp_path, capsys):
    report = run_demo(tmp_path / "demo", seed=0, size=SMALL)

    base, tuned = (report["metrics"][m]["qa_heldout"]["exact_match"] for m in ("base", "tuned"))
    assert tuned > base + 0.3, report["metrics"]
    assert report["metrics"]["base"]["fact_completion"]["exact_match"] > 0.5  # the base does know the facts
    written = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert written["metrics"] == report["metrics"]
    import torch

    assert written["versions"]["torch"] == torch.__version__ and written["seed"] == 0
    assert written["configs"]["sft"]["strategy"]["name"] == "lora"
    perplexity = written["corpus_perplexity"]  # forgetting, as a number
    assert 1.0 < perplexity["base"] < 100 and 1.0 < perplexity["tuned"] < 100
    assert all((tmp_path / "demo" / run / "loss.png").is_file() for run in ("pretrain", "sft"))
    assert "![LoRA SFT](sft/loss.png)" in (tmp_path / "demo" / "demo_report.md").read_text()
    assert "| base + LoRA SFT |" in (tmp_path / "demo" / "demo_report.md").read_text()
    assert "| base (pretrained) |" in capsys.readouterr().out
    # The numbers come from the generations in the report, not from anywhere else.
    answers = report["heldout_answers"]
    assert tuned == pytest.approx(sum(exact_match(a["tuned"], a["reference"]) for a in answers) / len(answers))
