"""The pipeline streams: rows live in Arrow files on disk (`rowstore`), stages run a file at a time (in forked
workers with num_proc > 1), and what the driver holds grows only by a few numbers per row.

Chunks are made tiny here (CHUNK / BATCH patched) so that small inputs span many files.
"""

from __future__ import annotations

import copy
import datetime
import json
import random
import tracemalloc
from collections import defaultdict

import numpy as np
import pytest

from conftest import write_jsonl
from tunesmith.data import rowstore
from tunesmith.data.clean import CleanSteps
from tunesmith.data.formats import Row
from tunesmith.data.pipeline import InstructOptions, Options, Source, prepare, read_sources, read_store
from tunesmith.data.quality import QualityLimits
from tunesmith.data.rowclean import clean_rows, clean_store
from tunesmith.data.rowstore import concat, file_rows, take, write_rows
from tunesmith.data.templates import install_template
from tunesmith.errors import DataError

WORDS = "river city market quiet engine morning report table signal garden copper winter travel".split()


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    install_template(tok, "chatml")
    return tok


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(rowstore, "CHUNK", 7)
    monkeypatch.setattr(rowstore, "BATCH", 3)


def _rows_of(store) -> list[Row]:
    return [row for path in store.files for rows in file_rows(path) for row in rows]


def _corpus(n: int, seed: int = 0) -> list[dict]:
    """Chat records with exact duplicates, near duplicates (one word changed), e-mail addresses, short answers."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if records and rng.random() < 0.1:
            records.append(rng.choice(records))
            continue
        answer = " ".join(rng.choice(WORDS) for _ in range(30))
        if records and rng.random() < 0.1:
            words = rng.choice(records)["messages"][1]["content"].split()
            answer = " ".join(words[:3] + ["changed"] + words[4:])
        if rng.random() < 0.1:
            answer += f" Mail ann{i}@example.com  now."
        if rng.random() < 0.05:
            answer = "Fine."  # too short for QualityLimits(min_words=8)
        records.append({"messages": [{"role": "user", "content": f"Tell me about {rng.choice(WORDS)} {i}."},
                                     {"role": "assistant", "content": answer}]})
    return records


# --- the row store ------------------------------------------------------------------------------------


def test_every_kind_of_row_round_trips_through_the_store(tmp_path, small_chunks):
    rows = [
        Row("a:1", messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"})),
        Row("a:2", messages=({"role": "user", "content": "Q"},), chosen="good", rejected="bad"),
        Row("a:3", messages=({"role": "user", "content": "Q"},), completion="ok", desirable=False),
        Row("a:4", prompt="2+2=", completion="4"),
        Row("a:5", text="a document"),
        Row("a:6", text="a film", label="positive"),
        # a labelled record keeps any value a Parquet file or saved dataset may hold, exactly
        Row("a:7", task="sentiment", record={"text": "x", "n": 3, "when": datetime.date(2024, 1, 2), "t": (1, 2)}),
    ] * 3
    store = write_rows(rows, tmp_path, "rows")
    assert store.lengths == [7, 7, 7] and len(store) == 21
    assert store.kinds[0] == {"chat", "preference", "unpaired", "completion", "text", "classification", "task"}
    assert _rows_of(store) == rows


def test_take_reuses_whole_files_and_keeps_the_order(tmp_path, small_chunks):
    rows = [Row(f"a:{i}", text=f"doc {i}") for i in range(20)]
    store = write_rows(rows, tmp_path / "all", "rows")
    chosen = take(store, np.array([0, 1, 2, 3, 4, 5, 6, 9, 19]), tmp_path / "some", "some")
    assert chosen.files[0] == store.files[0]  # rows 0-6: the whole first file
    assert [r.text for r in _rows_of(chosen)] == [f"doc {i}" for i in (0, 1, 2, 3, 4, 5, 6, 9, 19)]
    both = concat(chosen, take(store, np.array([7]), tmp_path / "one", "one"))
    assert [r.source for r in _rows_of(both)][-2:] == ["a:19", "a:7"]


def test_reading_into_a_store_gives_the_rows_and_reports_of_reading_into_a_list(tmp_path, small_chunks):
    path = tmp_path / "m.jsonl"
    chat = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]})
    path.write_text((chat + "\n") * 10 + "{broken\n" + (chat + "\n") * 5)
    sources = [Source(str(path), weight=1.5), Source(str(path), weight=0.5)]
    rows, reports = read_sources(sources, Options(on_error="skip", seed=3))
    store, store_reports = read_store(sources, Options(on_error="skip", seed=3), tmp_path / "store")
    assert _rows_of(store) == rows and store_reports == reports and len(store.files) > 2


# --- cleaning on disk gives what cleaning in memory gives ---------------------------------------------


@pytest.mark.parametrize("num_proc", [1, 2])
def test_cleaning_a_store_equals_cleaning_rows_in_memory(tmp_path, small_chunks, num_proc):
    rows = [Row(f"d.jsonl:{i + 1}", messages=tuple(r["messages"])) for i, r in enumerate(_corpus(120))]
    steps = CleanSteps(pii=True, quality=QualityLimits(min_words=8), near_dedup="group", near_threshold=0.7)
    kept, groups, report = clean_rows(list(rows), steps)
    store = write_rows(rows, tmp_path / "rows", "rows")
    kept_store, group_codes, store_report = clean_store(store, steps, tmp_path / "clean", num_proc)
    assert store_report == report
    assert report["exact_dedup"]["removed"] and report["quality"]["removed"] and report["pii"]["changed"]
    assert report["near_dedup"]["groups"] > 0
    assert _rows_of(kept_store) == kept

    def partition(labels):
        members = defaultdict(list)
        for i, label in enumerate(labels):
            members[label].append(i)
        return sorted(members.values())

    assert partition(group_codes.tolist()) == partition(groups)


# --- the pipeline, in parallel ------------------------------------------------------------------------


def _prepared(result) -> tuple:
    splits = {name: [(e.input_ids, e.labels, e.source, e.rejected_ids, e.desirable) for e in split]
              for name, split in result.splits.items()}
    report = {k: v for k, v in result.report.items() if k != "fingerprint"}
    return splits, json.loads(json.dumps(report))


def test_parallel_prepare_over_many_files_equals_one_process(tmp_path, chat_tokenizer, small_chunks):
    chat = write_jsonl(tmp_path / "c.jsonl", _corpus(60))
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No " * (1 + i % 9)}
                                               for i in range(30)])
    reviews = tmp_path / "s.csv"
    reviews.write_text("text,label\n" + "".join(f"film {i} was {'good' if i % 2 else 'bad'},"
                                                 f"{'positive' if i % 2 else 'negative'}\n" for i in range(40)))
    sources = {"train": [Source(str(chat)), Source(str(pairs), weight=1.5), Source(str(reviews), task="sentiment")]}
    options = Options(max_seq_len=40, validation=0.1, test=8, stratify_by="task", seed=2,
                      instruct=InstructOptions(shots=1))
    steps = CleanSteps(pii=True, near_dedup="group")
    one = prepare(chat_tokenizer, sources, options, clean=steps)
    two = prepare(chat_tokenizer, sources, Options(**{**vars(options), "num_proc": 2}), clean=steps,
                  cache_dir=tmp_path / "cache")
    assert _prepared(two) == _prepared(one)
    assert sum(len(split) for split in one.splits.values()) > 60
    assert one.report["splits"]["train"]["dropped_no_loss_tokens"] > 0  # long rejected answers do not fit


def test_saved_tables_load_with_datasets_and_keep_only_used_columns(tmp_path, chat_tokenizer, small_chunks):
    from datasets import load_from_disk

    chat = write_jsonl(tmp_path / "c.jsonl", _corpus(20))
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "Yes " * 600, "rejected": "No."}] * 5)
    result = prepare(chat_tokenizer, {"train": [Source(str(chat)), Source(str(pairs))]},
                     Options(max_seq_len=512, truncation="drop"), cache_dir=tmp_path / "cache")
    table = load_from_disk(str(tmp_path / "cache" / result.fingerprint / "train"))
    # every preference row was dropped (its chosen answer does not fit), so no rejected_* columns
    assert result.report["splits"]["train"]["dropped_no_loss_tokens"] == 5
    assert table.column_names == ["input_ids", "labels", "source"]
    assert len(table) == result.report["splits"]["train"]["examples"] == len(result.splits["train"])


def test_a_bad_record_in_a_later_file_is_named_by_its_index_in_the_split(tmp_path, chat_tokenizer, small_chunks):
    reviews = tmp_path / "s.csv"
    reviews.write_text("text,label\n" + "".join(f"film {i},{'maybe' if i == 17 else 'positive'}\n"
                                                 for i in range(30)))
    with pytest.raises(DataError, match=r"s\.csv\[17\]: label: 'maybe' is not one of"):
        prepare(chat_tokenizer, {"train": [Source(str(reviews), task="sentiment")]}, Options(num_proc=2))


# --- memory -------------------------------------------------------------------------------------------


def _peak_python_memory(tmp_path, tokenizer, num_rows: int) -> int:
    """Peak bytes of Python allocations (numpy's included) while `prepare` runs in this process (num_proc=1)."""
    path = write_jsonl(tmp_path / f"m{num_rows}.jsonl", _corpus(num_rows, seed=num_rows))
    steps = CleanSteps(pii=True, near_dedup="drop")
    tracemalloc.start()
    try:
        prepare(tokenizer, {"train": [Source(str(path))]}, Options(max_seq_len=64), cache_dir=tmp_path / "cache",
                clean=steps)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, chat_tokenizer, monkeypatch):
    """Five times the rows: the peak grows by the few numbers kept per row (duplicate keys, band keys while
    LSH runs, token lengths: ~150 bytes), not by the rows (~1.5 KB each as Python objects here)."""
    monkeypatch.setattr(rowstore, "CHUNK", 200)
    monkeypatch.setattr(rowstore, "BATCH", 50)
    small = _peak_python_memory(tmp_path, chat_tokenizer, 600)
    large = _peak_python_memory(tmp_path, chat_tokenizer, 3000)
    assert (large - small) / 2400 < 300, (small, large)
