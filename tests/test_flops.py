"""benchmarks/flops.py: the model FLOPs of a step against arithmetic written out here, what a batch holds, and the
share of the matmul ceiling a run reports."""

from __future__ import annotations

import pytest

from conftest import load_benchmark
from tunesmith.data.batching import collate, collate_flat
from tunesmith.data.tokenize import IGNORE_INDEX as X
from tunesmith.data.tokenize import Example
from tunesmith.train.estimate.shape import ModelShape

# Two blocks of width 4 (2 heads of 2), MLP 8, vocabulary 10. Linear weights per block:
# q, k, v, o 4 x 4 = 64; gate, up 4 x 8 = 64; down 8 x 4 = 32: 160, so N = 320 over both blocks.
SHAPE = ModelShape(model_type="llama", layers=2, hidden=4, intermediate=8, heads=2, kv_heads=2, head_dim=2,
                   vocab=10, tied=False, block_params=0, other_params=0,
                   block_linears={"q_proj": (4, 4), "k_proj": (4, 4), "v_proj": (4, 4), "o_proj": (4, 4),
                                  "gate_proj": (4, 8), "up_proj": (4, 8), "down_proj": (8, 4)})
# Sequences of 3 and 5 tokens: 8 tokens, 3^2 + 5^2 = 34, 5 loss positions.
WORK = {"tokens": 8, "sum_sq": 34, "loss_positions": 5, "positions": 8}


@pytest.fixture(scope="module")
def flops():
    return load_benchmark("flops")


def test_full_fine_tuning_flops(flops):
    """6N per token + attention 6 n_h.d per layer x sum of l^2 + head 6VH per loss position:
    6*320*8 + 6*4*2*34 + 6*10*4*5 = 15360 + 1632 + 1200."""
    assert flops.step_flops(SHAPE, "full", WORK) == 15360 + 1632 + 1200


def test_lora_flops_frozen_base_plus_adapters(flops):
    """4N per token, the same attention, head 4VH (no weight gradient), adapters r=2 on q and v:
    r (in + out) = 2 * 8 = 16 each, 64 over both blocks, 6 x 64 per token:
    4*320*8 + 1632 + 4*10*4*5 + 6*64*8 = 10240 + 1632 + 800 + 3072."""
    assert flops.step_flops(SHAPE, "lora", WORK, lora_r=2, lora_targets=("q_proj", "v_proj")) == \
        10240 + 1632 + 800 + 3072


def test_a_reference_forward_adds_a_third_of_the_full_step(flops):
    """2N per token + 2 n_h.d per layer x sum of l^2 + 2VH per loss position: 5120 + 544 + 400."""
    lora = flops.step_flops(SHAPE, "lora", WORK, lora_r=2, lora_targets=("q_proj",))
    assert flops.step_flops(SHAPE, "lora", WORK, lora_r=2, lora_targets=("q_proj",), reference=True) == \
        lora + 5120 + 544 + 400


def test_batch_work_is_the_same_padded_and_padding_free(flops):
    examples = [Example([5, 6, 7], [X, 6, 7]), Example([1, 2, 3, 4, 5], [X, X, 3, X, 5])]  # 2 + 2 loss tokens
    expected = {"tokens": 8, "sum_sq": 34, "loss_positions": 4}
    padded, flat = flops.batch_work([collate(examples, 0)]), flops.batch_work([collate_flat(examples)])
    assert padded == {**expected, "positions": 10} and flat == {**expected, "positions": 8}
    assert flops.batch_work([collate(examples, 0)] * 2) == {k: 2 * v for k, v in padded.items()}


def test_batch_work_of_a_pair_row_counts_the_shared_prompt_once(flops):
    """Prompt [1, 2, 3], answers [4, 5] and [6, 7, 8]: 2 shared tokens, then branches of 3 and 4 tokens (each keeps
    the prompt's last token): 9 tokens; 5^2 for the first conversation's run, 4^2 + 2*4*2 for the branch."""
    from tunesmith.objectives.pairs import collate_pairs_flat

    pair = Example([1, 2, 3, 4, 5], [X, X, X, 4, 5], rejected_ids=[1, 2, 3, 6, 7, 8],
                   rejected_labels=[X, X, X, 6, 7, 8])
    assert flops.batch_work([collate_pairs_flat([pair])]) == \
        {"tokens": 9, "sum_sq": 25 + 16 + 16, "loss_positions": 5, "positions": 9}


def test_step_gemms_carry_the_step_flops_of_the_linears(flops):
    """The GEMMs of a step, weighted by their counts, hold the FLOPs of its linears: 6 x (N + VH) per position
    for full fine-tuning, 4 x with a frozen base (attention and adapters are not GEMMs of the ceiling)."""
    for strategy, passes in (("full", 6), ("lora", 4)):
        gemms = flops.step_gemms(SHAPE, strategy, positions=8, loss_positions=8)
        assert sum(g.count * g.flops for g in gemms) == passes * (320 + 40) * 8
        for g in gemms:
            a, b = g.operands(flops.DTYPES["fp32"], "cpu")
            assert a.shape[1] == b.shape[0] and a.shape[0] * b.shape[0] * b.shape[1] * 2 == g.flops


def test_run_limit_reports_the_share_of_the_ceiling(flops):
    """A run of 100 tokens/s whose steps (after one warm-up) each need F FLOPs over 50 tokens: 2F FLOP/s."""
    run = {"tokens_per_s": 100.0, "tokens_per_cpu_s": 50.0, "step_tokens": [50, 50, 50]}
    out = flops.run_limit(run, [WORK] * 3, 1, SHAPE, "full")
    model = 2 * flops.step_flops(SHAPE, "full", WORK)
    assert out["model_flops_per_s"] == pytest.approx(model) and out["flops_per_step"] == pytest.approx(model / 2)
    assert out["share_of_ceiling"] == pytest.approx(model / out["ceiling_flops_per_s"])
    assert out["ceiling_flops_per_s"] > 0 and out["cpu_share_of_ceiling"] > 0
