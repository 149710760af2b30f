"""The training loop: accumulation equals the large batch, determinism, true step counts, schedules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator

from conftest import chat_rows, write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.data.batching import collate, epoch_batches
from tunesmith.data.formats import load_rows
from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import tokenize_rows
from tunesmith.model.strategies import apply_strategy
from tunesmith.objectives import build_objective
from tunesmith.objectives.tokens import summed_nll
from tunesmith.track.metrics import read_metrics
from tunesmith.train.loop import LoopSettings, steps_per_epoch, train_step, window
from tunesmith.train.optim import lr_multiplier
from tunesmith.train.run import train


def run_config(model_dir, data_file, out, **sections) -> dict:
    """A small SFT LoRA run config; `sections` override whole keys, e.g. train={"max_steps": 3}."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(data_file)], "template": "chatml", "max_seq_len": 256},
        "strategy": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
        "train": {"output_dir": str(out), "max_steps": 6, "micro_batch_size": 4, "lr": 1e-3, "seed": 7},
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(24))


def test_summed_nll_matches_hand_computation():
    """Two loss positions out of three; values computed by hand from log-softmax.

    logits row 0 = [0, ln 3] -> p(token 1) = 3/4; row 1 = [ln 2, 0] -> p(token 0) = 2/3.
    Row 2 is the last position (predicts nothing). Label 0 of the sequence is never predicted.
    NLL sum = -ln(3/4) - ln(2/3) = ln(4/3) + ln(3/2) = ln 2.
    """
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    total, n = summed_nll(logits, labels)
    assert n == 2
    assert total.item() == pytest.approx(math.log(2), rel=1e-6)


def test_summed_nll_chunking_does_not_change_the_sum():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 11)
    labels = torch.randint(0, 11, (3, 9))
    labels[0, :4] = -100
    whole, n = summed_nll(logits, labels)
    chunked, m = summed_nll(logits, labels, chunk_size=5)
    assert n == m == 3 * 8 - 3
    torch.testing.assert_close(whole, chunked)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sft_loss_skips_the_prompts_logits_and_equals_the_full_loss(family, model_dirs, tokenizer, chat_file):
    """The SFT loss asks for logits from the batch's first answer token on; loss, token count and gradients
    equal those of the full logits."""
    from transformers import AutoModelForCausalLM

    from tunesmith.objectives.sft import sft_loss
    from tunesmith.objectives.tokens import model_inputs

    batch = collate(_tokenized(tokenizer, chat_file)[:4], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    positions = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: positions.append(out.shape[1]))
    results = []
    for trimmed in (True, False):
        model.zero_grad()
        if trimmed:
            out = sft_loss(model, batch)
            loss, count = out.loss_sum, out.num_units
        else:
            loss, count = summed_nll(model(**model_inputs(batch)).logits, batch["labels"])
        loss.backward()
        results.append((loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}))
    hook.remove()
    width = batch["input_ids"].shape[1]
    assert positions[0] < width and positions[1] == width  # the trimmed pass computed fewer positions
    (a, ca, ga), (b, cb, gb) = results
    assert ca == cb
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,expected", [
    ("linear", [1 / 3, 2 / 3, 1.0, 5 / 7, 3 / 7, 1 / 7]),
    ("cosine", [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi * 2 / 7)), 0.5 * (1 + math.cos(math.pi * 4 / 7)),
                0.5 * (1 + math.cos(math.pi * 6 / 7))]),
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedule_values(kind, expected):
    """2 warmup steps of 9 total: warmup (s+1)/3, then decay over the remaining 7 steps."""
    got = [lr_multiplier(s, total_steps=9, warmup_steps=2, kind=kind) for s in (0, 1, 2, 4, 6, 8)]
    assert got == pytest.approx(expected)


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_batches(10, 3, seed=1, epoch=0) == epoch_batches(10, 3, seed=1, epoch=0)
    assert epoch_batches(10, 3, seed=1, epoch=0) != epoch_batches(10, 3, seed=1, epoch=1)
    batches = epoch_batches(10, 3, seed=1, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(10))


def test_windows_cover_each_epoch_once_with_a_short_last_window():
    """10 examples, micro-batch 3, accumulation 3: 4 micro-batches -> 2 steps per epoch (3 + 1)."""
    examples = list(range(10))
    s = LoopSettings(total_steps=4, micro_batch_size=3, grad_accum=3, seed=0)
    assert steps_per_epoch(10, 3, 3) == 2
    for epoch in range(2):
        seen = [e for step in (2 * epoch, 2 * epoch + 1) for b in window(examples, step, s, 0, 1) for e in b]
        assert sorted(seen) == examples


def _tokenized(tokenizer, path, n=8):
    tokenizer = copy.deepcopy(tokenizer)  # the session fixture stays without a template
    install_template(tokenizer, "chatml")
    examples, _ = tokenize_rows(tokenizer, load_rows(path)[:n], max_seq_len=256)
    lengths = {len(e.input_ids) for e in examples}
    assert len(lengths) > 3, "the test needs variable lengths"
    return examples


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_gradient_accumulation_equals_large_batch(family, strategy, model_dirs, tokenizer, chat_file):
    """Micro-batch 2 x accumulation 4 gives the gradient and logged loss of batch 8 x 1 (fp32, rel 1e-5).

    With SGD at lr=1 and no clipping, the parameter change of one step is exactly minus the gradient.
    """
    from transformers import AutoModelForCausalLM

    examples = _tokenized(tokenizer, chat_file)
    accelerator = Accelerator(cpu=True)
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dirs[family])
        model = apply_strategy(model, strategy, lora_r=4, lora_dropout=0.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        batches = [collate(examples[i : i + micro], tokenizer.pad_token_id) for i in range(0, 8, micro)]
        assert len(batches) == accum
        stats = train_step(model, build_objective("sft"), optimizer, scheduler, accelerator, batches, None)
        grads = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
        results.append((stats["loss_sum"] / stats["units"], grads))
    (loss_big, grads_big), (loss_acc, grads_acc) = results
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for name, grad in grads_big.items():
        torch.testing.assert_close(grads_acc[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_big.values())


def test_logged_loss_does_not_depend_on_accumulation(model_dirs, chat_file, tmp_path):
    """The whole command: 2 x 4 and 8 x 1 log the same loss at every step, within 1e-5 relative."""
    losses = []
    for micro, accum in ((8, 1), (2, 4)):
        cfg = run_config(model_dirs["llama"], chat_file, tmp_path / f"run-{micro}",
                         train={"micro_batch_size": micro, "grad_accum": accum, "max_steps": 3})
        train(config_from_dict(cfg))
        losses.append([r["loss"] for r in read_metrics(tmp_path / f"run-{micro}" / "metrics.jsonl") if "loss" in r])
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_same_seed_gives_identical_losses_for_50_steps(model_dirs, chat_file, tmp_path):
    """Bit-identical losses for 50 steps on CPU, with LoRA dropout active (exercises the RNG)."""
    runs = []
    for name in ("a", "b"):
        cfg = run_config(model_dirs["qwen2"], chat_file, tmp_path / name,
                         strategy={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                         train={"max_steps": 50, "micro_batch_size": 2})
        train(config_from_dict(cfg))
        runs.append([r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r])
    assert len(runs[0]) == 50
    assert runs[0] == runs[1]


def test_total_steps_equal_optimizer_steps_run(model_dirs, chat_file, tmp_path):
    """24 examples, micro-batch 5, accumulation 2: 5 micro-batches -> 3 steps per epoch; 2 epochs -> 6 steps."""
    cfg = run_config(model_dirs["llama"], chat_file, tmp_path / "run",
                     train={"max_steps": None, "epochs": 2, "micro_batch_size": 5, "grad_accum": 2})
    report = train(config_from_dict(cfg))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert report["steps"] == 6
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert sum(r["loss_tokens"] for r in records) == 2 * report["data"]["train"]["loss_tokens"]
    assert records[-1]["epoch"] == 2.0
