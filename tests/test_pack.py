"""Packing isolation: packed loss equals per-document losses, documents do not see each other."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.data.batching import collate
from tunesmith.data.pack import pack_blocks, pack_examples, packing_efficiency
from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.objectives.tokens import model_inputs, summed_nll


def _docs(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Documents of 3..20 tokens; the first half of each is a masked prompt."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        ids = [rng.randrange(5, vocab) for _ in range(rng.randint(3, 20))]
        half = len(ids) // 2
        docs.append(Example(ids, [IGNORE_INDEX] * half + ids[half:], f"doc{i}"))
    return docs


def test_best_fit_decreasing_places_every_document_once():
    docs = [Example([1] * n, [1] * n, f"d{n}") for n in (9, 7, 6, 5, 3, 2, 1)]
    packed = pack_examples(docs, max_length=10)
    # Longest first into the fullest bin it fits: [9, 1], [7, 3], [6, 2] then 5 opens a fourth bin.
    assert sorted(len(p.input_ids) for p in packed) == [5, 8, 10, 10]
    assert sorted(s for p in packed for s in p.source.split(";")) == sorted(d.source for d in docs)
    assert packing_efficiency(packed, 10) == pytest.approx(33 / 40)


def test_positions_restart_and_first_labels_are_masked():
    docs = [Example([7, 8, 9], [7, 8, 9], "a"), Example([4, 5], [4, 5], "b")]
    (packed,) = pack_examples(docs, max_length=8)
    assert packed.input_ids == [7, 8, 9, 4, 5]
    assert packed.position_ids == [0, 1, 2, 0, 1]
    assert packed.labels == [IGNORE_INDEX, 8, 9, IGNORE_INDEX, 5]


def test_oversized_document_is_an_error():
    with pytest.raises(ValueError, match="doc0: 30 tokens"):
        pack_examples([Example([1] * 30, [1] * 30, "doc0")], max_length=16)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_loss_equals_per_document_losses(model_dirs, tokenizer, family):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    docs = _docs(12, len(tokenizer))
    packed = pack_examples(docs, max_length=48)
    assert len(packed) < len(docs)
    with torch.no_grad():
        batch = collate(packed, tokenizer.pad_token_id)
        packed_sum, packed_n = summed_nll(model(**model_inputs(batch)).logits, batch["labels"])
        single_sum, single_n = 0.0, 0
        for doc in docs:
            one = collate([doc], tokenizer.pad_token_id)
            s, n = summed_nll(model(**model_inputs(one)).logits, one["labels"])
            single_sum, single_n = single_sum + s.item(), single_n + n
    assert packed_n == single_n
    assert packed_sum.item() == pytest.approx(single_sum, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_changing_one_document_leaves_the_others_logits_unchanged(model_dirs, tokenizer, family):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    a, b = Example([11, 12, 13, 14], [11, 12, 13, 14], "a"), Example([21, 22, 23], [21, 22, 23], "b")
    changed_a = Example([31, 32, 33, 34, 35], [31, 32, 33, 34, 35], "a2")
    with torch.no_grad():
        first = collate([_concat(a, b)], tokenizer.pad_token_id)
        second = collate([_concat(changed_a, b)], tokenizer.pad_token_id)
        logits_1 = model(**model_inputs(first)).logits[0, 4:7]
        logits_2 = model(**model_inputs(second)).logits[0, 5:8]
        alone = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
    torch.testing.assert_close(logits_1, logits_2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_1, alone, rtol=1e-5, atol=1e-5)


def _concat(first: Example, second: Example) -> Example:
    """Two documents in a fixed order (pack_examples would reorder by length)."""
    (packed,) = pack_examples([first], 64)
    return Example(first.input_ids + second.input_ids, packed.labels + [IGNORE_INDEX] + second.labels[1:],
                   "pair", position_ids=list(range(len(first.input_ids))) + list(range(len(second.input_ids))))


def test_pretraining_blocks_are_cut_from_the_concatenated_stream():
    docs = [Example([1, 2, 3, 0], [1, 2, 3, 0], "x"), Example([4, 5, 0], [4, 5, 0], "y"),
            Example([6, 7, 8, 9, 0], [6, 7, 8, 9, 0], "z")]
    blocks = pack_blocks(docs, block_size=5)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]]
    assert all(b.labels == b.input_ids and b.position_ids is None for b in blocks)
