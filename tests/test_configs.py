"""Every shipped training recipe runs end to end on a tiny model: parsed, built, trained two steps, saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CORPUS, chat_rows, write_jsonl
from tunesmith.config import load_config
from tunesmith.train.run import train

CONFIGS = Path(__file__).parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("sft_*.yaml"))
ALIGN_RECIPES = sorted(CONFIGS / f"{name}.yaml" for name in ("reward", "dpo", "ipo", "simpo", "orpo", "kto", "grpo", "ppo"))


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"sft_lora", "sft_dora", "sft_qlora", "sft_full", "sft_freeze"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_on_a_tiny_model(recipe, model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    # The tiny tokenizer has no chat template of its own, so the recipes that use the model's get chatml.
    overrides = [f"model.name_or_path={model_dirs['llama']}", f"data.train={data}", "data.max_seq_len=256",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.micro_batch_size=2",
                 "train.grad_accum=1", "tracking.progress_bar=false", "data.template=chatml", "strategy.freeze.last_n_layers=1"]
    cfg = load_config(recipe, overrides)
    report = train(cfg)
    assert report["steps"] == 2
    assert (tmp_path / "run" / "final").is_dir()
    assert (tmp_path / "run" / "config.yaml").read_text().count("max_steps: 2") == 1


def _alignment_data(kind: str, tmp_path: Path) -> Path:
    from test_align import preference_rows, unpaired_rows
    from test_rl import arithmetic_rows

    rows = {"preference": preference_rows(12, seed=0), "unpaired": unpaired_rows(12, seed=0),
            "prompts": arithmetic_rows()[:12]}[kind]
    return write_jsonl(tmp_path / f"{kind}.jsonl", rows)


@pytest.mark.parametrize("recipe", ALIGN_RECIPES, ids=lambda p: p.stem)
def test_alignment_recipe_trains_on_a_tiny_model(recipe, model_dirs, tmp_path):
    cfg = load_config(recipe)
    kind = {"kto": "unpaired", "grpo": "prompts", "ppo": "prompts"}.get(cfg.train.objective, "preference")
    data = _alignment_data(kind, tmp_path)
    overrides = [f"model.name_or_path={model_dirs['llama']}", f"data.train=[{data}]", "data.validation=[]",
                 f"data.format={'auto' if kind == 'prompts' else kind}", "data.max_seq_len=128",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.micro_batch_size=4",
                 "train.grad_accum=1", "tracking.progress_bar=false", "align.max_new_tokens=4"]
    report = train(load_config(recipe, overrides))
    assert report["steps"] == 2
    assert (tmp_path / "run" / "final").is_dir()


def test_pretrain_scratch_recipe_builds_and_trains_a_new_model(tokenizer, tmp_path):
    """configs/pretrain_scratch.yaml: step 1 (a tokenizer directory) faked by the shared tiny tokenizer, step 2
    as shipped except for the paths and fewer, smaller steps."""
    recipe = CONFIGS / "pretrain_scratch.yaml"
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    data = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for text in CORPUS])
    overrides = [f"model.tokenizer={tmp_path / 'tokenizer'}", f"data.train=[{data}]",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.micro_batch_size=4",
                 "data.max_seq_len=64", "tracking.progress_bar=false"]
    cfg = load_config(recipe, overrides)
    report = train(cfg)
    assert report["steps"] == 2
    assert report["total_parameters"] > 0 and report["trainable_parameters"] == report["total_parameters"]
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.init == cfg.model.init and (tmp_path / "run" / "final" / "config.json").is_file()
