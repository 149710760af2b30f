"""The data pipeline: every source type, error policies, weights, truncation policies, cache, `prepare`."""

from __future__ import annotations

import copy
import json
import os

import pytest

from conftest import write_jsonl
from tunesmith.data.formats import iter_rows, load_rows
from tunesmith.data.pipeline import ExampleTable, Options, Source, prepare, read_sources
from tunesmith.data.sources import iter_records
from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.errors import DataError

CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    install_template(tok, "chatml")
    return tok


# --- sources ------------------------------------------------------------------------------------------


def test_csv_and_tsv_with_locations_and_field_mapping(tmp_path):
    (tmp_path / "a.csv").write_text('question,answer\n"What, exactly?",Yes\n\n"multi\nline",No\n')
    (tmp_path / "b.tsv").write_text("question\tanswer\nQ1\tA1\n")
    rows = load_rows(tmp_path / "a.csv", "completion", fields={"prompt": "question", "completion": "answer"})
    assert [(r.source, r.prompt, r.completion) for r in rows] == [
        (f"{tmp_path}/a.csv:2", "What, exactly?", "Yes"), (f"{tmp_path}/a.csv:4", "multi\nline", "No")]
    rows = load_rows(tmp_path / "b.tsv", "completion", fields={"prompt": "question", "completion": "answer"})
    assert (rows[0].prompt, rows[0].completion) == ("Q1", "A1")


def test_json_array_records_are_located_by_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "one"},\n\n  {"text": "two"}\n]\n')
    assert [where for where, _ in iter_records(str(path))] == [f"{path}:2 [0]", f"{path}:4 [1]"]


def test_a_bad_item_of_a_one_line_json_array_is_named_by_its_index(tmp_path):
    path = tmp_path / "d.json"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps([good, good, good, {"messages": 42}]))
    with pytest.raises(DataError) as caught:
        list(iter_rows(path))
    assert str(caught.value) == f"{path}:1 [3]: messages: expected a non-empty list of turns, got int 42"


def test_json_object_of_columns(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"text": ["good film", "bad film"], "label": ["pos", "neg"]}))
    rows = load_rows(path)
    assert [(r.kind, r.text, r.label) for r in rows] == [("classification", "good film", "pos"),
                                                         ("classification", "bad film", "neg")]


def test_parquet_and_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    table = Dataset.from_dict({"prompt": ["2+2=", "3+3="], "completion": ["4", "6"]})
    table.to_parquet(str(tmp_path / "p.parquet"))
    DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    for path, where in ((tmp_path / "p.parquet", "p.parquet:row 1"), (tmp_path / "saved", "saved:row 1")):
        rows = load_rows(path)
        assert [r.completion for r in rows] == ["4", "6"] and rows[1].source.endswith(where)


def test_text_files_folders_and_globs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first document\nstill first\n")
    (tmp_path / "docs" / "b.md").write_text("second\n\nthird line\n")
    assert [r.text for r in load_rows(tmp_path / "docs")] == ["first document\nstill first\n", "second\n\nthird line\n"]
    per_line = load_rows(str(tmp_path / "docs" / "*.md"), text_unit="line")
    assert [(r.source.rsplit("/", 1)[1], r.text) for r in per_line] == [("b.md:1", "second"), ("b.md:3", "third line")]


def test_preference_and_unpaired_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": [{"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
    ])
    rows = load_rows(path)
    assert [(r.kind, r.messages[-1]["content"], r.chosen, r.rejected) for r in rows] == [
        ("preference", "Capital of France?", "Paris.", "Lyon."), ("preference", "2+2?", "4", "5")]
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Hello", "label": True},
                                              {"prompt": "Hi", "completion": "Go away", "label": "no"}])
    assert [(r.kind, r.desirable) for r in load_rows(path)] == [("unpaired", True), ("unpaired", False)]


# A malformed-input corpus for the non-JSONL readers and the newer formats (JSONL cases: test_formats.py).
MALFORMED = {
    "csv_wrong_field_count": ("x.csv", b"text,label\nok,pos\nonly-one\n", "auto", "x.csv:3: expected 2 fields"),
    "csv_bad_utf8": ("x.csv", b"text\n\xff\xfe\n", "auto", "x.csv:2: invalid UTF-8 at byte 0"),
    "csv_empty_cell": ("x.csv", b"prompt,completion\nq,\n", "auto", "x.csv:2: completion: missing field"),
    "json_not_array": ("x.json", b'"text"', "auto", "x.json:1: expected a JSON array of objects"),
    "json_bad_item": ("x.json", b'[{"text": "a"},\n 3]', "auto", "x.json:2 [1]: expected a JSON object, got int"),
    "json_syntax": ("x.json", b'[{"text": "a"},\n {"text": }]', "auto", "x.json:2: invalid JSON: Expecting value"),
    "json_missing_comma": ("x.json", b'[{"text": "a"}\n {"text": "b"}]', "auto", "x.json:2: invalid JSON: expected ','"),
    "json_ragged_columns": ("x.json", b'{"text": ["a", "b"], "label": ["x"]}', "auto",
                            "x.json: columns have different lengths"),
    "label_wrong_type": ("x.jsonl", b'{"text": "a", "label": [1]}\n', "auto",
                         "x.jsonl:1: label: expected a string or an integer, got list"),
    "label_empty": ("x.jsonl", b'{"text": "a", "label": " "}\n', "auto", "x.jsonl:1: label: empty"),
    "completion_empty": ("x.jsonl", b'{"prompt": "a", "completion": ""}\n', "completion",
                         "x.jsonl:1: completion: empty"),
    "preference_missing_rejected": ("x.jsonl", b'{"prompt": "a", "chosen": "b"}\n', "preference",
                                    "x.jsonl:1: rejected: missing field"),
    "preference_answer_not_assistant": ("x.jsonl",
                                        b'{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], '
                                        b'"rejected": "c"}\n', "auto",
                                        "x.jsonl:1: chosen: expected turns ending with the assistant's"),
    "preference_prompt_ends_with_assistant": ("x.jsonl",
                                              b'{"prompt": [{"role": "assistant", "content": "b"}], '
                                              b'"chosen": "c", "rejected": "d"}\n', "auto",
                                              "x.jsonl:1: prompt: expected turns ending with the user's"),
    "unpaired_bad_label": ("x.jsonl", b'{"prompt": "a", "completion": "b", "label": "maybe"}\n', "auto",
                           "x.jsonl:1: label: expected desirable yes/no"),
    "unsupported_suffix": ("x.xml", b"<a/>", "auto", "x.xml: unsupported file type .xml"),
    "text_bad_utf8": ("x.txt", b"caf\xe9", "auto", "x.txt: invalid UTF-8 at byte 3"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_inputs_name_file_line_and_field(tmp_path, name):
    filename, content, fmt, expected = MALFORMED[name]
    (tmp_path / filename).write_bytes(content)
    with pytest.raises(DataError) as info:
        load_rows(tmp_path / filename, fmt)
    assert str(info.value).startswith(f"{tmp_path}/{expected}"), str(info.value)


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"\*.parquet: no file matches"):
        load_rows(str(tmp_path / "*.parquet"))


# --- policies and weights -----------------------------------------------------------------------------


def test_skip_policy_drops_and_counts_bad_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(CHAT) + "\n{broken\n" + json.dumps({"messages": []}) + "\n" + json.dumps(CHAT) + "\n")
    with pytest.raises(DataError, match=":2: invalid JSON"):
        read_sources([Source(str(path))], Options())
    rows, report = read_sources([Source(str(path))], Options(on_error="skip"))
    assert len(rows) == 2
    r = report[str(path)]
    assert (r["rows_read"], r["rows_kept"], r["skipped"]) == (2, 2, 2)
    assert r["errors"][0].startswith(f"{path}:2: invalid JSON") and ":3: messages" in r["errors"][1]


def test_source_weights_repeat_and_sample_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"text": f"doc {i}"} for i in range(200)])
    twice, _ = read_sources([Source(str(path), weight=2.0)], Options())
    assert len(twice) == 400 and twice[0] == twice[1]
    half, report = read_sources([Source(str(path), weight=0.5)], Options(seed=1))
    again, _ = read_sources([Source(str(path), weight=0.5)], Options(seed=1))
    assert half == again and 70 < len(half) < 130
    assert report[str(path)]["rows_kept"] == len(half)


# --- tokenisation, truncation, packing, cache --------------------------------------------------------


def _long_chat(n_words: int) -> dict:
    return {"messages": [{"role": "user", "content": "word " * n_words},
                         {"role": "assistant", "content": "It is five."}]}


@pytest.mark.parametrize("policy,kept,truncated", [("right", 2, 1), ("left", 3, 1), ("drop", 2, 1)])
def test_truncation_policies_count_what_they_do(tmp_path, chat_tokenizer, policy, kept, truncated):
    """One long prompt: right truncation cuts the answer away (dropped, counted), left keeps the answer
    (the prompt loses its start), drop drops it."""
    path = write_jsonl(tmp_path / "t.jsonl", [CHAT, _long_chat(60), CHAT])
    prepared = prepare(chat_tokenizer, {"train": [Source(str(path))]}, Options(max_seq_len=40, truncation=policy))
    split = prepared.report["splits"]["train"]
    assert (split["examples"], split["truncated"]) == (kept, truncated)
    assert split["dropped_no_loss_tokens"] == 3 - kept
    if policy == "left":
        long = next(e for e in prepared.splits["train"] if len(e.input_ids) == 40)
        supervised = chat_tokenizer.decode([t for t in long.labels if t != IGNORE_INDEX])
        assert supervised == "It is five.<|im_end|>"


def test_completion_rows_supervise_the_completion_and_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Two plus two is", "completion": " four."}])
    prepared = prepare(tokenizer, {"train": [Source(str(path))]}, Options())
    (example,) = prepared.splits["train"]
    prompt_ids = tokenizer("Two plus two is")["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == " four.<|end_of_text|>"


def test_split_off_validation_and_test(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [CHAT] * 50)
    prepared = prepare(chat_tokenizer, {"train": [Source(str(path))]}, Options(validation=0.1, test=5))
    assert [len(prepared.splits[s]) for s in ("train", "validation", "test")] == [40, 5, 5]


def test_packing_reports_efficiency(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [CHAT] * 30)
    prepared = prepare(chat_tokenizer, {"train": [Source(str(path))]}, Options(pack=True, max_seq_len=64))
    packing = prepared.report["splits"]["train"]["packing"]
    assert packing["documents"] == 30 and packing["sequences"] < 30
    assert all(e.position_ids is not None and len(e.input_ids) <= 64 for e in prepared.splits["train"])


def test_second_run_reuses_the_cache_and_a_changed_file_invalidates_it(tmp_path, chat_tokenizer, monkeypatch):
    import tunesmith.data.pipeline as pipeline

    path = write_jsonl(tmp_path / "c.jsonl", [CHAT] * 5)
    sources = {"train": [Source(str(path))]}
    first = prepare(chat_tokenizer, sources, Options(), cache_dir=tmp_path / "cache")
    tokenized, real_tokenize = [], pipeline.tokenize
    monkeypatch.setattr(pipeline, "tokenize", lambda *a, **k: tokenized.append(1) or real_tokenize(*a, **k))
    second = prepare(chat_tokenizer, sources, Options(), cache_dir=tmp_path / "cache")
    assert not tokenized, "the second run read the cached tables"
    assert isinstance(second.splits["train"], ExampleTable)
    monkeypatch.undo()
    assert second.fingerprint == first.fingerprint
    assert [e.input_ids for e in second.splits["train"]] == [e.input_ids for e in first.splits["train"]]
    assert second.report == json.loads(json.dumps(first.report))
    write_jsonl(path, [CHAT] * 6)
    os.utime(path, ns=(1, 1))
    third = prepare(chat_tokenizer, sources, Options(), cache_dir=tmp_path / "cache")
    assert third.fingerprint != first.fingerprint and len(third.splits["train"]) == 6
    other_options = prepare(chat_tokenizer, sources, Options(max_seq_len=8), cache_dir=tmp_path / "cache")
    assert other_options.fingerprint != third.fingerprint


def test_prepare_command_writes_tables_and_reports(tmp_path, model_dirs):
    from datasets import load_from_disk

    from tunesmith.config import config_from_dict
    from tunesmith.data.prepare import prepare_command
    from tunesmith.model.run_tokenizer import build_tokenizer

    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 20)
    cfg = config_from_dict({"model": {"name_or_path": str(model_dirs["llama"])},
                            "data": {"train": [str(path)], "template": "chatml", "split": {"validation": 4}},
                            "train": {"output_dir": str(tmp_path / "run")}})
    out = prepare_command(cfg, build_tokenizer(cfg)[0])
    assert {p.name for p in out.iterdir()} == {"train", "validation", "data_report.json", "data_report.md",
                                              "token_lengths.png"}
    assert len(load_from_disk(str(out / "train"))) == 16
    report = json.loads((out / "data_report.json").read_text())
    assert report["splits"]["validation"]["examples"] == 4
    assert "| train | 16 | 16 |" in (out / "data_report.md").read_text()


def test_labelled_records_become_instruction_data_with_train_only_exemplars(tmp_path, chat_tokenizer):
    """A sentiment CSV with a task: each record rendered by a seeded template; 2-shot exemplars come from the
    training split only, and only the final answer is supervised."""
    from tunesmith.data.pipeline import InstructOptions

    reviews = [(f"review number {i} was {'great' if i % 2 else 'awful'}", "positive" if i % 2 else "negative")
               for i in range(12)]
    path = tmp_path / "s.csv"
    path.write_text("review,sentiment\n" + "".join(f"{t},{label}\n" for t, label in reviews))
    source = Source(str(path), fields=(("label", "sentiment"), ("text", "review")), task="sentiment")
    options = Options(test=3, seed=5, instruct=InstructOptions(shots=2))
    prepared = prepare(chat_tokenizer, {"train": [source]}, options)
    train_texts = {chat_tokenizer.decode(e.input_ids) for e in prepared.splits["train"]}
    for example in prepared.splits["test"]:
        text = chat_tokenizer.decode(example.input_ids)
        query = next(t for t, _ in reviews if t in text.rsplit("<|im_start|>user", 1)[1])
        exemplars = [t for t, _ in reviews if t in text and t != query]
        assert len(exemplars) == 2 and all(any(t in tt for tt in train_texts) for t in exemplars)
        assert not any(query in tt for tt in train_texts), "a test record never appears in training"
        supervised = chat_tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
        assert supervised.count("<|im_end|>") == 1


# --- cleaning in the pipeline ------------------------------------------------------------------------


def _qa(i: int, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"Tell me about topic {i} in a few sentences please."},
                         {"role": "assistant", "content": answer or
                          f"Topic {i} is about the history of river {i} and the towns that grew along its banks "
                          f"over many centuries of trade and farming."}]}


def test_cleaning_rewrites_every_message_and_counts_each_step(tmp_path, chat_tokenizer):
    from tunesmith.data.clean import CleanSteps

    rows = [_qa(i) for i in range(10)] + [_qa(3), _qa(11, "Write to ann@example.com  or  call +44 20 7946 0958.")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    steps = CleanSteps(normalize=True, pii=True, exact_dedup=True)
    prepared = prepare(chat_tokenizer, {"train": [Source(str(path))]}, Options(), clean=steps)
    clean = prepared.report["clean"]["train"]
    assert (clean["rows"], clean["kept"], clean["exact_dedup"]["removed"]) == (12, 11, 1)
    assert clean["pii"] == {"changed": 1, "replaced": {"EMAIL": 1, "PHONE": 1}}
    assert clean["normalize"]["changed"] == 1  # the doubled spaces
    assert clean["removed_examples"] == [f"{path}:11: exact_dedup: duplicate of {path}:4"]
    texts = [chat_tokenizer.decode(e.input_ids) for e in prepared.splits["train"]]
    assert any("Write to [EMAIL] or call [PHONE]." in t for t in texts)


def test_a_planted_near_duplicate_never_straddles_two_splits(tmp_path, chat_tokenizer):
    """Row 0 and a copy with one word changed: with near-dup grouping they land in the same split, whatever
    the seed, while without it some seed separates them."""
    from tunesmith.data.clean import CleanSteps

    rows = [_qa(i) for i in range(40)]
    rows.append(_qa(0, rows[0]["messages"][1]["content"].replace("farming", "fishing")))
    path = write_jsonl(tmp_path / "n.jsonl", rows)
    marker = "river 0 and"

    def sides(seed: int, clean) -> set[str]:
        prepared = prepare(chat_tokenizer, {"train": [Source(str(path))]},
                           Options(validation=0.25, test=0.25, seed=seed), clean=clean)
        return {name for name, split in prepared.splits.items()
                if any(marker in chat_tokenizer.decode(e.input_ids) for e in split)}

    grouped = CleanSteps(normalize=False, exact_dedup=False, near_dedup="group", near_threshold=0.7)
    assert all(len(sides(seed, grouped)) == 1 for seed in range(8))
    assert any(len(sides(seed, None)) == 2 for seed in range(8))


def test_held_out_cluster_goes_to_test_whole(tmp_path, chat_tokenizer):
    """NLI records (cluster nli) held out: none in train or validation, all in test; sentiment untouched."""
    from tunesmith.data.pipeline import InstructOptions

    senti = tmp_path / "s.csv"
    senti.write_text("text,label\n" + "".join(f"film {i} was fine,positive\n" for i in range(10)))
    nli = write_jsonl(tmp_path / "n.jsonl", [{"premise": f"A man walks {i}.", "hypothesis": "A person moves.",
                                             "label": "entailment"} for i in range(6)])
    sources = {"train": [Source(str(senti), task="sentiment"), Source(str(nli), task="nli")]}
    options = Options(validation=2, instruct=InstructOptions(held_out_clusters=("nli",)))
    prepared = prepare(chat_tokenizer, sources, options)
    assert prepared.report["held_out_clusters"] == {"clusters": ["nli"], "rows": 6}
    decoded = {name: [chat_tokenizer.decode(e.input_ids) for e in split] for name, split in prepared.splits.items()}
    assert len(decoded["test"]) == 6 and all("A man walks" in t for t in decoded["test"])
    assert not any("A man walks" in t for t in decoded["train"] + decoded["validation"])
    assert len(decoded["train"]) + len(decoded["validation"]) == 10
    with pytest.raises(DataError, match="no task type is in cluster"):
        prepare(chat_tokenizer, sources, Options(instruct=InstructOptions(held_out_clusters=("poetry",))))


def test_prepare_refuses_a_template_that_never_ends_a_turn(tmp_path, tokenizer):
    """Without an end-of-turn token the tuned model would never learn to stop: refused before tokenising."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    with pytest.raises(DataError, match="no end-of-turn or EOS token"):
        prepare(tok, {"train": [Source(str(path))]}, Options())


def test_held_out_clusters_with_near_duplicate_groups_and_a_split(tmp_path, chat_tokenizer):
    """Held-out records leave train before the split: the near-duplicate groups must follow the rows that stay
    (they once kept the rows' old positions, and the split failed or separated a group)."""
    from tunesmith.data.clean import CleanSteps
    from tunesmith.data.pipeline import InstructOptions

    nli = write_jsonl(tmp_path / "n.jsonl", [{"premise": f"A man walks {i}.", "hypothesis": "A person moves.",
                                             "label": "entailment"} for i in range(6)])
    rows = [_qa(i) for i in range(30)]
    rows.append(_qa(0, rows[0]["messages"][1]["content"].replace("farming", "fishing")))
    chat = write_jsonl(tmp_path / "c.jsonl", rows)
    sources = {"train": [Source(str(nli), task="nli"), Source(str(chat))]}
    steps = CleanSteps(normalize=False, exact_dedup=False, near_dedup="group", near_threshold=0.7)
    for seed in range(4):
        options = Options(validation=0.3, seed=seed, instruct=InstructOptions(held_out_clusters=("nli",)))
        prepared = prepare(chat_tokenizer, sources, options, clean=steps)
        assert prepared.report["split"]["train"] + prepared.report["split"]["validation"] == 31
        sides = {name for name, split in prepared.splits.items()
                 if any("river 0 and" in chat_tokenizer.decode(e.input_ids) for e in split)}
        assert len(sides) == 1 and len(prepared.splits["test"]) == 6


def test_the_arrow_layout_is_what_datasets_writes_for_the_same_columns(tmp_path):
    """data/arrow.py writes tables without importing `datasets`: its schema (types and features metadata) and
    `dataset_info.json` equal `datasets.Features` / `DatasetInfo` for every column set the pipeline writes."""
    from datasets import DatasetInfo, Features, Sequence, Value

    from tunesmith.data.arrow import TOKEN_COLUMNS, schema, write_dataset_info

    ids = Sequence(Value("int32"))
    types = {"ids": ids, "string": Value("string"), "bool": Value("bool"), "int64": Value("int64")}
    for columns in (list(TOKEN_COLUMNS), ["input_ids", "labels", "source"],
                    ["input_ids", "labels", "source", "rejected_ids", "rejected_labels", "desirable"]):
        features = Features({name: types[TOKEN_COLUMNS[name]] for name in columns})
        assert schema(columns) == features.arrow_schema
        assert schema(columns).metadata == features.arrow_schema.metadata
        ours, theirs = tmp_path / "ours", tmp_path / "theirs"
        for folder in (ours, theirs):
            folder.mkdir(exist_ok=True)
        write_dataset_info(ours, columns)
        DatasetInfo(features=features).write_to_directory(str(theirs))
        assert json.loads((ours / "dataset_info.json").read_text()) == \
            json.loads((theirs / "dataset_info.json").read_text())
