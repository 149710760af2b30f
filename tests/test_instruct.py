"""FLAN-style instruction templates: the built-in library, rendering, seeding, few-shot, CoT, user YAML, clusters."""

from __future__ import annotations

import random

import pytest

from tunesmith.data.instruct import (
    Dataset,
    FewShot,
    build_dataset,
    build_examples,
    builtin_tasks,
    final_answer,
    leave_one_cluster_out,
    load_tasks,
    select_templates,
    split_clusters,
)
from tunesmith.errors import ConfigError, DataError

SAMPLES = {
    "sentiment": {"text": "The film was a delight from start to finish.", "label": "positive"},
    "classification": {"text": "The striker scored twice in the final.", "label": "sports",
                       "options": ["sports", "politics", "science"]},
    "nli": {"premise": "A man is playing a guitar on stage.", "hypothesis": "A person is making music.",
            "label": "neutral"},
    "qa": {"question": "What is the capital of France?", "answer": "Paris",
           "context": "Paris is the capital and largest city of France."},
    "summarisation": {"document": "The council voted on Tuesday to build a new bridge. Work starts in spring.",
                      "summary": "Council approves new bridge."},
    "translation": {"source": "The cat sleeps.", "target": "Le chat dort.", "source_lang": "English",
                    "target_lang": "French"},
    "extraction": {"text": "She flew to Lima last week.", "field": "city", "value": "Lima"},
    "completion": {"text": "The capital of France is", "ending": "Paris."},
    "paraphrase": {"text": "Paris is the capital city of France.", "paraphrase": "The capital of France is Paris."},
    "arithmetic": {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7",
                   "reasoning": "Tom starts with 3 apples and buys 4 more. 3 + 4 = 7."},
}
CLOSED_BOOK_QA = {"question": "Who wrote Hamlet?", "answer": "Shakespeare"}  # `context` is optional
ALL_TEMPLATES = [(name, t.id) for name, task in builtin_tasks().items() for t in task.templates]


def _review(i: int, label: str = "positive") -> dict:
    return {"text": f"Review number {i}: it was {'great' if label == 'positive' else 'awful'}.", "label": label}


def _review_in(text: str) -> str:
    """The one review text in a rendered turn pair (templates put it in the prompt or, inverted, the answer)."""
    found = [f"Review number {i}: it was {mood}." for i in range(200) for mood in ("great", "awful")
             if f"Review number {i}: it was {mood}." in text]
    assert len(found) == 1, text
    return found[0]


def _one(record: dict, task: str, template_id: str, **kwargs) -> tuple[str, str]:
    """(prompt, answer) of `record` under one named template."""
    messages = build_examples([record], task, template_ids=[template_id], **kwargs)[0]["messages"]
    return messages[-2]["content"], messages[-1]["content"]


def _write(tmp_path, text: str, name: str = "mine.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the built-in library


def test_builtin_task_types_have_ten_templates_and_one_to_three_inverted():
    tasks = builtin_tasks()
    assert set(SAMPLES) <= set(tasks)
    for name, task in tasks.items():
        num_inverted = sum(t.inverted for t in task.templates)
        assert len(task.templates) >= 10, name
        assert 1 <= num_inverted <= 3, name
        assert len({t.id for t in task.templates}) == len(task.templates), name
        assert task.cluster and task.inverted_answer in task.fields, name


@pytest.mark.parametrize("task,template_id", ALL_TEMPLATES)
def test_every_builtin_template_renders_cleanly(task, template_id):
    records = [SAMPLES[task]] + ([CLOSED_BOOK_QA] if task == "qa" else [])
    for record in records:
        prompt, answer = _one(record, task, template_id)
        for text in (prompt, answer):
            assert text.strip() and text == text.strip()
            assert not any(mark in text for mark in ("{{", "}}", "{%", "%}", "{#", "None"))
            assert "\n\n\n" not in text  # optional blocks leave no stray blank lines


def test_inverted_answers_are_the_input_and_other_answers_are_not():
    for name, task in builtin_tasks().items():
        record = SAMPLES[name]
        for template in task.templates:
            _, answer = _one(record, name, template.id)
            assert (answer == record[task.inverted_answer]) == template.inverted, template.id


def test_options_are_shown_flan_style_by_some_templates_only():
    prompt, answer = _one(SAMPLES["sentiment"], "sentiment", "sentiment_01")
    assert prompt.endswith("OPTIONS:\n- negative\n- positive") and answer == "positive"
    for name in ("sentiment", "classification", "nli"):
        shown = [("OPTIONS:" in _one(SAMPLES[name], name, t.id)[0]) for t in builtin_tasks()[name].templates]
        assert any(shown) and not all(shown), name


def test_nli_answers_through_the_verbalizer_or_the_raw_label():
    assert _one(SAMPLES["nli"], "nli", "nli_01")[1] == "it is not possible to tell"
    assert _one(SAMPLES["nli"], "nli", "nli_06")[1] == "neutral"


def test_classification_options_come_from_the_record_or_the_dataset():
    record = {"text": "Parliament passed the bill.", "label": "politics"}
    with pytest.raises(DataError, match=r"news\[0\]: options: missing field"):
        build_examples([record], "classification", source="news")
    prompt, _ = _one(record, "classification", "classification_01", options=["sports", "politics"])
    assert "- sports\n- politics" in prompt


def test_missing_field_names_the_field_and_the_record():
    with pytest.raises(DataError, match=r"records\[0\]: text: empty"):
        build_examples([{"text": "  ", "label": "positive"}], "sentiment")
    records = [_review(0), {"text": "No label here."}]
    with pytest.raises(DataError, match=r"reviews\[1\]: label: missing field \(task 'sentiment' needs text, label\)"):
        build_examples(records, "sentiment", source="reviews")
    with pytest.raises(DataError, match=r"records\[0\]: label: 'meh' is not one of \['negative', 'positive'\]"):
        build_examples([_review(0, "meh")], "sentiment")
    with pytest.raises(DataError, match=r"records\[0\]: label: 'yes' is not one of \['entailment'"):
        build_examples([{**SAMPLES["nli"], "label": "yes"}], "nli")


def test_output_shape_and_system_prompt():
    example = build_examples([SAMPLES["qa"]], "qa", system_prompt="Be brief.", seed=3)[0]
    assert set(example) == {"messages", "task", "template_id", "inverted"}
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    assert example["messages"][0]["content"] == "Be brief." and example["task"] == "qa"
    assert example["inverted"] == example["template_id"].startswith("qa_inv")


# ---------------------------------------------------------------- choosing templates


def test_same_seed_same_examples_and_choice_independent_of_order():
    records = [_review(i, random.Random(i).choice(["positive", "negative"])) for i in range(60)]
    first = build_examples(records, "sentiment", seed=7)
    assert first == build_examples(records, "sentiment", seed=7)
    assert [e["template_id"] for e in first] != [e["template_id"] for e in build_examples(records, "sentiment", seed=8)]
    assert len({e["template_id"] for e in first}) >= 8  # the seed spreads records over the templates
    # a record keeps its template when others are added, removed or reordered
    shuffled = records[::-1][:30]
    by_text = {e["messages"][0]["content"]: e["template_id"] for e in first}
    for example in build_examples(shuffled, "sentiment", seed=7):
        assert by_text[example["messages"][0]["content"]] == example["template_id"]


def test_restrict_to_non_inverted_or_to_chosen_ids():
    records = [_review(i) for i in range(40)]
    assert not any(e["inverted"] for e in build_examples(records, "sentiment", inverted=False))
    subset = {"sentiment_02", "sentiment_inv_1"}
    assert {e["template_id"] for e in build_examples(records, "sentiment", template_ids=subset)} == subset
    with pytest.raises(ConfigError, match="no template.* sentiment_99"):
        select_templates(builtin_tasks()["sentiment"], ["sentiment_99"])
    with pytest.raises(ConfigError, match="no templates left"):
        select_templates(builtin_tasks()["sentiment"], ["sentiment_inv_1"], inverted=False)


# ---------------------------------------------------------------- few-shot


def test_fewshot_chat_never_includes_the_query_and_draws_only_from_the_pool():
    # the pool is the query set itself, with copies: neither a record nor its copy may be its own exemplar
    pool = [_review(i) for i in range(6)] * 2
    pool_texts = {r["text"] for r in pool}
    for seed in range(20):
        examples = build_examples(pool, "sentiment", seed=seed, fewshot=FewShot(pool, k=3))
        for record, example in zip(pool, examples):
            messages = example["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * 4
            shots = [_review_in(messages[i]["content"] + "\n" + messages[i + 1]["content"]) for i in (0, 2, 4)]
            assert set(shots) <= pool_texts and len(set(shots)) == 3  # from the pool, and distinct
            assert record["text"] not in shots
            assert _review_in(messages[-2]["content"] + "\n" + messages[-1]["content"]) == record["text"]


def test_fewshot_inline_and_deterministic():
    pool = [_review(i) for i in range(8)]
    query = [_review(100, "negative")]
    fewshot = FewShot(pool, k=2, format="inline")
    example = build_examples(query, "sentiment", seed=5, template_ids=["sentiment_04"], fewshot=fewshot)[0]
    messages = example["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] == "negative"
    assert messages[0]["content"].count("Sentiment:") == 3 and messages[0]["content"].count("\npositive") == 2
    assert example == build_examples(query, "sentiment", seed=5, template_ids=["sentiment_04"], fewshot=fewshot)[0]


def test_fewshot_pool_too_small_or_bad_settings():
    pool = [_review(0), _review(1)]
    with pytest.raises(DataError, match=r"records\[0\]: few-shot needs 2 exemplars but pool has only 1 distinct"):
        build_examples(pool[:1], "sentiment", fewshot=FewShot(pool + pool, k=2))
    with pytest.raises(DataError, match=r"pool\[1\]: label: missing field"):
        build_examples(pool, "sentiment", fewshot=FewShot([_review(2), {"text": "x"}], k=1))
    with pytest.raises(ConfigError, match="format"):
        build_examples(pool, "sentiment", fewshot=FewShot(pool, k=1, format="html"))


def test_dataset_fewshot_exemplars_come_from_the_training_split_only():
    train = [_review(i) for i in range(10)]
    test = [{"text": f"Held-out review {i}: awful.", "label": "negative"} for i in range(10)]
    dataset = Dataset("reviews", "sentiment", train=train, test=test)
    for example in build_dataset(dataset, "test", shots=2, seed=0):
        context = " ".join(m["content"] for m in example["messages"][:-2])
        assert "Held-out" not in context and context.count("Review number") == 2
    with pytest.raises(ConfigError, match="unknown split 'validation'"):
        build_dataset(dataset, "validation")


# ---------------------------------------------------------------- chain of thought


def test_chain_of_thought_examples_end_on_the_answer():
    records = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "reasoning": f"{i} + {i} = {2 * i}."}
               for i in range(1, 9)]
    examples = build_examples(records, "arithmetic", cot=True, fewshot=FewShot(records, k=2), seed=2)
    for record, example in zip(records, examples):
        messages = example["messages"]
        assert not example["inverted"] and len(messages) == 6
        assert all(m["content"].endswith("Let's think step by step.") for m in messages[0::2])
        assert messages[-1]["content"] == f"{record['reasoning']} So the answer is {record['answer']}."
        assert all(final_answer(m["content"]) is not None for m in messages[1::2])
        assert final_answer(messages[-1]["content"]) == record["answer"]


def test_chain_of_thought_needs_reasoning_and_a_cot_format():
    with pytest.raises(DataError, match=r"records\[0\]: reasoning: missing field"):
        build_examples([{"question": "1 + 1?", "answer": "2"}], "arithmetic", cot=True)
    with pytest.raises(ConfigError, match="no chain-of-thought format"):
        build_examples([SAMPLES["sentiment"]], "sentiment", cot=True)


@pytest.mark.parametrize("text,expected", [
    ("3 + 4 = 7. So the answer is 7.", "7"),
    ("First 2, then 5. The answer is: 12 apples.", "12"),
    ("The final answer is $1,234.50.", "1234.50"),
    ("The answer is **-3**", "-3"),
    ("I think the answer is 4. Wait, no: the answer is 5.", "5"),
    ("She paid 10 and got 3 back\n#### 7", "7"),
    ("Answer: 42", "42"),
    ("The capital is clear. The answer is Paris. Hope that helps!", "Paris"),
    ("He had 5 apples, ate 2, and has 3 left", "3"),
    ("No idea at all.", None),
])
def test_final_answer(text, expected):
    assert final_answer(text) == expected


# ---------------------------------------------------------------- user templates in YAML

NEW_TASK = """
tasks:
  topic:
    cluster: topic
    fields: [headline, topic]
    optional: [options]
    options: [world, sports]
    inverted_answer: headline
    templates:
      - id: topic_1
        prompt: "{{ headline }}\\n\\nWhat is this about?\\n{{ options_block }}"
        answer: "{{ topic }}"
      - id: topic_inv
        prompt: Write a headline about {{ topic }}.
        answer: "{{ headline }}"
        inverted: true
  sentiment:
    templates:
      - id: sentiment_mine
        prompt: "Mood of: {{ text }}"
        answer: "{{ label }}"
"""


def test_user_yaml_adds_task_types_and_extends_builtins(tmp_path):
    tasks = load_tasks(_write(tmp_path, NEW_TASK))
    record = {"headline": "Local team wins the cup", "topic": "sports"}
    prompt, answer = _one(record, "topic", "topic_1", tasks=tasks)
    assert prompt.endswith("OPTIONS:\n- world\n- sports") and answer == "sports"
    assert _one(record, "topic", "topic_inv", tasks=tasks)[1] == record["headline"]
    assert len(tasks["sentiment"].templates) == len(builtin_tasks()["sentiment"].templates) + 1
    assert _one(SAMPLES["sentiment"], "sentiment", "sentiment_mine", tasks=tasks)[0].startswith("Mood of: ")
    assert "topic" not in builtin_tasks()  # the built-in library is not modified


@pytest.mark.parametrize("template,message", [
    ('prompt: "{{ headline }} {{ titel }}", answer: "{{ topic }}"', "undefined field.* titel"),
    ('prompt: "{{ headline ", answer: "{{ topic }}"', "prompt: Jinja syntax error"),
    ('prompt: "{{ headline }}"', "missing key 'answer'"),
    ('prompt: "{{ headline }}", answer: "{{ topic }}", invert: true', "unknown key 'invert'.*'inverted'"),
    ('prompt: "{{ headline }}", answer: "{{ topic }}", inverted: maybe', "inverted: expected true or false"),
])
def test_bad_user_template_fails_at_load_naming_file_and_template(tmp_path, template, message):
    text = ("tasks:\n  topic:\n    cluster: topic\n    fields: [headline, topic]\n    templates:\n"
            f"      - {{id: bad_one, {template}}}\n")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"mine\.yaml: task 'topic': template 'bad_one'.*{message}"):
        load_tasks(path)


@pytest.mark.parametrize("text,message", [
    ("tasks:\n  topic:\n    fields: [headline]\n    templates: []\n", "task 'topic': missing key 'cluster'"),
    ("tasks:\n  sentiment:\n    fields: [text]\n", "task 'sentiment'.* only cluster, templates may be given"),
    ("tasks:\n  sentiment:\n    templates:\n      - id: sentiment_01\n        prompt: x\n        answer: y\n",
     "template 'sentiment_01': duplicate template id"),
    ("tasks:\n  a: {}\n  a: {}\n", "duplicate key 'a'"),
    ("task:\n  a: {}\n", "one top-level key 'tasks'"),
])
def test_bad_user_task_file_names_file_and_task(tmp_path, text, message):
    with pytest.raises(ConfigError, match=rf"mine\.yaml: .*{message}"):
        load_tasks(_write(tmp_path, text))


# ---------------------------------------------------------------- task clusters


def _datasets() -> list[Dataset]:
    return [Dataset("imdb", "sentiment"), Dataset("sst2", "classification", cluster="sentiment"),
            Dataset("snli", "nli"), Dataset("mnli", "nli"), Dataset("squad", "qa", cluster="reading"),
            Dataset("triviaqa", "qa"), Dataset("gsm8k", "arithmetic"), Dataset("wmt", "translation")]


def test_split_clusters_holds_out_whole_clusters():
    train, held_out = split_clusters(_datasets(), ["sentiment", "nli"])
    assert [d.name for d in held_out] == ["imdb", "sst2", "snli", "mnli"]
    assert [d.name for d in train] == ["squad", "triviaqa", "gsm8k", "wmt"]
    with pytest.raises(ConfigError, match=r"unknown held-out cluster\(s\) \['sentimnet'\]"):
        split_clusters(_datasets(), ["sentimnet"])
    with pytest.raises(ConfigError, match="nothing is left to train on"):
        split_clusters(_datasets()[:2], ["sentiment"])
    with pytest.raises(ConfigError, match="duplicate dataset names"):
        split_clusters(_datasets() + [Dataset("imdb", "sentiment")], ["nli"])


def test_leave_one_cluster_out_never_splits_a_cluster():
    datasets = _datasets()
    folds = list(leave_one_cluster_out(datasets))
    assert [c for c, _, _ in folds] == ["math", "nli", "qa", "reading", "sentiment", "translation"]
    for cluster, train, held_out in folds:
        assert {d.name for d in train} | {d.name for d in held_out} == {d.name for d in datasets}
        assert {(d.cluster or builtin_tasks()[d.task].cluster) for d in held_out} == {cluster}
        assert cluster not in {(d.cluster or builtin_tasks()[d.task].cluster) for d in train}
