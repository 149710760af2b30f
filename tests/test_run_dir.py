"""What a run leaves behind (the run directory of the README) and the validation loss it reports."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from conftest import chat_rows, write_jsonl
from test_train import run_config
from tunesmith.config import config_from_dict, load_config
from tunesmith.data.batching import collate
from tunesmith.data.formats import load_rows
from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import tokenize_rows
from tunesmith.objectives import build_objective
from tunesmith.objectives.tokens import summed_nll
from tunesmith.track.metrics import read_metrics
from tunesmith.train.loop import evaluate_loss
from tunesmith.train.run import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("rundir")
    data = write_jsonl(root / "train.jsonl", chat_rows(16, seed=1))
    val = write_jsonl(root / "val.jsonl", chat_rows(5, seed=2))
    raw = run_config(model_dirs["llama"], data, root / "run", data={"validation": [str(val)]},
                     train={"max_steps": 6, "save_every": 3}, eval={"every": 2},
                     tracking={"progress_bar": True, "log_level": "info"})
    report = train(config_from_dict(raw))
    return root / "run", raw, report


def test_run_directory_contents(run):
    out, raw, report = run
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "train.log", "metrics.jsonl", "checkpoints", "final",
                                              "report.json", "report.md"}
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-3", "step-6"}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in (out / "final").iterdir()}
    assert json.loads((out / "report.json").read_text())["steps"] == 6 == report["steps"]
    assert {"data_report.json", "data_report.md", "token_lengths.png"} <= {p.name for p in out.iterdir()}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss](loss.png)" in (out / "report.md").read_text()


def test_adapter_keeps_the_end_of_turn_stop_token(run):
    """Generation from final/ stops at <|im_end|> as well as EOS (PEFT alone would not save this)."""
    from transformers import AutoTokenizer

    out = run[0] / "final"
    tokenizer = AutoTokenizer.from_pretrained(out)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(eos) == sorted([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])


def test_resolved_config_reloads_to_the_same_config(run):
    out, raw, _ = run
    assert load_config(out / "config.yaml") == config_from_dict(raw)
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"]["lora"]["r"] == 4


def test_train_log_states_parameter_counts_and_data(run):
    out, _, report = run
    text = (out / "train.log").read_text()
    assert f"{report['trainable_parameters']:,} trainable of {report['total_parameters']:,} parameters" in text
    assert "train data: 16 rows -> 16 examples" in text
    assert "validation loss" in text


def test_validation_loss_every_n_steps(run):
    out, _, report = run
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert report["eval_loss"] == evals[-1]["eval_loss"]


def test_evaluate_loss_is_token_weighted(model_dirs, tokenizer, tmp_path):
    """Whatever the batch size, the loss is total NLL / total loss tokens, computed here example by example."""
    tokenizer = copy.deepcopy(tokenizer)  # the session fixture stays without a template
    install_template(tokenizer, "chatml")
    path = write_jsonl(tmp_path / "v.jsonl", chat_rows(7, seed=9))
    examples, _ = tokenize_rows(tokenizer, load_rows(path), 256)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            batch = collate([e], tokenizer.pad_token_id)
            nll, n = summed_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])
            total, count = total + nll.item(), count + n
    accelerator = Accelerator(cpu=True)
    for batch_size in (1, 3, 7):
        got = evaluate_loss(model, build_objective("sft"), examples, batch_size, tokenizer.pad_token_id, accelerator)
        assert got == pytest.approx(total / count, rel=1e-6)
