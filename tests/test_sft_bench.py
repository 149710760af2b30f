"""benchmarks/sft_bench.py on a tiny model: its tunesmith side measures every step, and TRL's side is given the
conversations tunesmith trains on, in the same order, with the same ids and loss tokens (running TRL takes
minutes: its figures live in docs/PERFORMANCE.md, not here)."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

TINY = ["--conversations", "8", "--max-words", "60", "--vocab-size", "400", "--hidden-size", "32", "--layers", "2",
        "--heads", "2", "--intermediate-size", "64", "--batch", "2", "--steps", "3", "--warmup", "1"]


@pytest.fixture(scope="module")
def sft_bench():
    return load_benchmark("sft_bench")


@pytest.mark.parametrize("case", ["tunesmith-lora", "tunesmith-lora-padded"])
def test_sft_bench_counts_the_loss_tokens_of_the_batches_trl_is_given(sft_bench, tmp_path, monkeypatch, case):
    """Padding-free (one row per step, the conversations end to end) and padded (a row per conversation)."""
    import tunesmith.train.loop as loop

    args = sft_bench.parse_args(TINY)
    sft_bench.prepare(tmp_path, args)
    batches = []  # the micro-batches of each step, as tunesmith's sampler drew and collated them

    def recording_step(model, objective, optimizer, scheduler, accelerator, micro_batches, *a, **kw):
        batches.append(micro_batches)
        return train_step(model, objective, optimizer, scheduler, accelerator, micro_batches, *a, **kw)

    train_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", recording_step)
    result = sft_bench.run_one(case, tmp_path, args)

    # What TRL gets, tokenised as SFTTrainer does with assistant_only_loss: row k*batch+i is row i of step k,
    # with tunesmith's ids, and a loss exactly where tunesmith's labels have one.
    encodings = sft_bench.trl_encodings(sft_bench.trl_tokenizer(tmp_path), sft_bench.trl_rows(tmp_path, args))
    assert [len(step) for step in batches] == [1, 1, 1]  # one micro-batch per step
    for k, (batch,) in enumerate(batches):
        step = encodings[k * args.batch : (k + 1) * args.batch]
        expected = [(ids, [t if m else -100 for t, m in zip(ids, mask)]) for ids, mask in step]
        assert all(0 < sum(mask) < len(ids) for ids, mask in step)  # replies only: the prompts carry no loss
        if case.endswith("-padded"):
            rows = [(batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist())
                    for i, n in enumerate(batch["token_mask"].sum(1).tolist())]
            assert rows == expected
        else:
            assert batch["input_ids"].tolist() == [[t for ids, _ in expected for t in ids]]
            assert batch["labels"].tolist() == [[t for _, labels in expected for t in labels]]

    # The measured tokens of a step are its loss-bearing tokens, the count TRL's side takes from its labels.
    shapes = sft_bench.step_shapes(encodings, args.batch, args.steps)
    assert result["step_tokens"] == [s["loss_tokens"] for s in shapes]
    assert all(s["loss_tokens"] < s["tokens"] <= s["padded"] for s in shapes)
    assert result["tokens_per_s"] > 0 and result["peak_mb"] >= 0 and len(result["losses"]) == 3
    assert [w["loss_positions"] for w in result["step_work"]] == result["step_tokens"]  # the head's FLOPs
    assert [w["tokens"] for w in result["step_work"]] == [s["tokens"] for s in shapes]
    assert loop.train_step is recording_step  # the timing wrapper is gone after the run


def test_trl_rows_refuse_more_steps_than_one_epoch_holds(sft_bench, tmp_path):
    args = sft_bench.parse_args([*TINY, "--steps", "5"])  # 5 steps of 2 > 8 conversations
    (tmp_path / "chats.jsonl").write_text('{"messages": []}\n' * 8)
    with pytest.raises(ValueError, match="raise --conversations"):
        sft_bench.trl_rows(tmp_path, args)
