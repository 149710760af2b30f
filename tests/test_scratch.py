"""Pretraining from scratch: `tunesmith tokenizer`, a model built from `model.init`, its run reloaded from final/
and from a checkpoint, and continued pretraining from its final/."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.templates import TEMPLATES, install_template
from tunesmith.errors import ConfigError, DataError
from tunesmith.model.loading import load_model_and_tokenizer
from tunesmith.eval.models import load_for_eval
from tunesmith.model.tokenizer import corpus_texts, tokenizer_command, train_corpus_tokenizer
from tunesmith.track.metrics import read_metrics
from tunesmith.model.build import build_model
from tunesmith.model.run_tokenizer import build_tokenizer
from tunesmith.train.run import save_final, train

VOCAB = 320
SENTENCES = [
    "The capital of Marnburg is Tonvik, and its people speak Velsh.",
    "Seven plus five is twelve. Twelve minus five is seven.",
    "A fox crossed the frozen river at dawn and never looked back.",
    "The review said: a warm, funny film with a weak ending.",
]
TEXT = "The capital of Marnburg is Tonvik. Ünïcode, emoji 🙂 and  two spaces\nsurvive."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rows = [{"text": " ".join(SENTENCES[j % 4] for j in range(i, i + 3))} for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", rows)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    assert main(["tokenizer", str(corpus), "--vocab-size", str(VOCAB), "--chat-template", "chatml",
                 "--output", str(out)]) == 0
    return out


def scratch_config(tokenizer_dir: Path, corpus: Path, output_dir: Path, *overrides: str):
    """A 2-layer llama of width 32 (4 query heads, 2 key/value heads, MLP 64) trained on the corpus."""
    return load_config(None, [
        f"model.tokenizer={tokenizer_dir}", "model.init.family=llama", "model.init.num_layers=2",
        "model.init.hidden_size=32", "model.init.num_heads=4", "model.init.num_kv_heads=2",
        "model.init.intermediate_size=64", "model.init.max_position_embeddings=64", "model.dtype=fp32",
        f"data.train={corpus}", "data.format=text", "data.max_seq_len=64", "data.pack=true",
        "strategy.name=full", "train.objective=clm", f"train.output_dir={output_dir}", "train.max_steps=12",
        "train.micro_batch_size=4", "train.lr=1e-2", "train.scheduler=constant", "train.seed=3",
        "tracking.progress_bar=false", *overrides,
    ])


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "step" in r]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_command_output_loads_with_its_chat_template(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == VOCAB
    messages = [{"role": "user", "content": "Capital of Marnburg?"}, {"role": "assistant", "content": "Tonvik"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nCapital of Marnburg?<|im_end|>\n<|im_start|>assistant\nTonvik<|im_end|>\n"
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 2 and ids.count(end) == 2  # each marker one token, never spelled out in pieces
    assert tok(TEXT, add_special_tokens=False)["input_ids"] != []
    assert tok.decode(tok(TEXT, add_special_tokens=False)["input_ids"]) == TEXT
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")


def test_tokenizer_is_byte_identical_across_runs(tokenizer_dir, corpus, tmp_path):
    again = tokenizer_command([str(corpus)], tmp_path / "again", vocab_size=VOCAB, chat_template="chatml")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_gets_its_special_tokens_as_single_tokens(template):
    tok = train_corpus_tokenizer(SENTENCES * 5, vocab_size=300, chat_template=template)
    assert tok.chat_template == TEMPLATES[template].jinja
    assert install_template(tok, template) == []  # nothing left to add: the embeddings already cover them
    for marker in TEMPLATES[template].special_tokens:
        assert tok(marker, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(marker)]


def test_tokenizer_input_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--vocab-size: at least 263"):  # 4 specials + 2 chatml + 256 bytes + 1
        train_corpus_tokenizer(SENTENCES, vocab_size=200, chat_template="chatml")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text': missing"):
        list(corpus_texts([str(bad)]))
    assert main(["tokenizer", str(bad), "--output", str(tmp_path / "tok")]) == 2
    assert capsys.readouterr().err == f"error: {bad}:2: field 'text': missing\n"
    assert not (tmp_path / "tok").exists()
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "a"}, {"body": "  "}, {"body": "b"}])
    assert list(corpus_texts([str(other)], field="body")) == ["a", "b"]  # blank documents are left out


# ------------------------------------------------------------------------------------------------ model.init


def test_built_model_has_the_asked_shape_and_parameter_count(tokenizer_dir, corpus, tmp_path):
    """Llama, vocab V = 320, width H = 32, 2 layers, 4 query heads of 8, 2 key/value heads, MLP width 64:
    embeddings V*H = 10,240 and an untied head as many; per layer q 32*32 = 1,024, k and v 32*16 = 512 each,
    o 1,024, gate/up/down 32*64 = 2,048 each, two norms of 32: 9,280; final norm 32.
    Total 2*10,240 + 2*9,280 + 32 = 39,072."""
    cfg = scratch_config(tokenizer_dir, corpus, tmp_path / "run")
    tokenizer, added = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, added)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == ("llama", 2, 32, 4, 2, 64, VOCAB, False)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                tokenizer.pad_token_id)
    assert sum(p.numel() for p in model.parameters()) == 39_072
    tied = build_model(scratch_config(tokenizer_dir, corpus, tmp_path / "run", "model.init.tie_embeddings=true"),
                       tokenizer, added)
    assert sum(p.numel() for p in tied.parameters()) == 39_072 - 10_240


def test_padding_with_eos_never_freezes_the_eos_embedding(tokenizer_dir, corpus, tmp_path):
    """A tokenizer that pads with EOS: the config gets no pad id, so EOS is no zero, untrained padding_idx row."""
    cfg = scratch_config(tokenizer_dir, corpus, tmp_path / "run")
    tokenizer, _ = build_tokenizer(cfg)
    tokenizer.pad_token = tokenizer.eos_token
    model = build_model(cfg, tokenizer, [])
    assert model.config.pad_token_id is None and model.model.embed_tokens.padding_idx is None
    assert model.model.embed_tokens.weight[tokenizer.eos_token_id].abs().sum() > 0


def test_estimate_reads_the_shape_from_model_init(tokenizer_dir, corpus, tmp_path, capsys):
    """No checkpoint to read a config.json from: the estimate counts the model model.init describes."""
    from tunesmith.train.estimate import estimate_command

    report = estimate_command(scratch_config(tokenizer_dir, corpus, tmp_path / "run"))
    assert report["model"]["params"] == 39_072  # as counted by hand above
    assert report["config"] == "model.init (llama)" and "peak" in capsys.readouterr().out


def test_same_seed_same_initial_weights(tokenizer_dir, corpus, tmp_path):
    cfg = scratch_config(tokenizer_dir, corpus, tmp_path / "run")
    tokenizer, _ = build_tokenizer(cfg)

    def weights(*overrides):
        model = build_model(scratch_config(tokenizer_dir, corpus, tmp_path / "run", *overrides), tokenizer, [])
        return model.state_dict()

    first, again, explicit, other = weights(), weights(), weights("model.init.seed=3"), weights("model.init.seed=4")
    rng = torch.get_rng_state()
    weights()
    assert torch.equal(rng, torch.get_rng_state())  # building draws from its own generator state
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]) and torch.equal(tensor, explicit[name]), name  # default: train.seed
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_saved_config_rebuilds_the_built_model_exactly(family, tokenizer_dir, corpus, tmp_path):
    """config.json describes the architecture fully: plain transformers rebuilds the same function."""
    kv_heads = "model.init.num_kv_heads=null" if family == "gpt2" else "model.init.num_kv_heads=2"
    cfg = scratch_config(tokenizer_dir, corpus, tmp_path / "run", f"model.init.family={family}", kv_heads,
                         "model.init.tie_embeddings=true")
    tokenizer, _ = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, []).eval()
    save_final(model, tokenizer, tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


@pytest.fixture(scope="module")
def scratch_run(tokenizer_dir, corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("scratch") / "run"
    report = train(scratch_config(tokenizer_dir, corpus, run_dir, "train.save_every=6"))
    assert report["steps"] == 12
    return run_dir


def test_pretraining_from_scratch_starts_at_uniform_loss_and_learns(scratch_run):
    losses = step_losses(scratch_run)
    assert len(losses) == 12
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.10)  # random weights: about uniform over the vocab
    assert losses[-1] < 0.75 * losses[0]
    final = scratch_run / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in final.iterdir()}
    assert json.loads((final / "config.json").read_text())["num_hidden_layers"] == 2


def test_final_and_checkpoint_reload_to_the_same_model(scratch_run):
    """final/ through plain transformers, the run directory through the delivery loader, and the last
    checkpoint rebuilt from the run's config.yaml (model.init) plus its weights: the same logits."""
    final = AutoModelForCausalLM.from_pretrained(scratch_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(scratch_run / "final")
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    expected = logits(final, ids)
    delivered, _ = load_model_and_tokenizer(str(scratch_run), dtype="fp32")
    checkpoint = load_for_eval(str(scratch_run / "checkpoints" / "step-12"))
    assert checkpoint.baseline is None  # built from scratch: nothing it was fine-tuned from
    torch.testing.assert_close(logits(delivered, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(checkpoint.model.cpu(), ids), expected, rtol=0, atol=1e-6)


def test_resumed_scratch_run_ends_with_the_same_weights(scratch_run, tokenizer_dir, corpus, tmp_path):
    """6 steps, resume, 6 steps = 12 steps straight, bitwise: the resumed run rebuilds its model from model.init
    and then loads the checkpoint, as `tunesmith train --resume` does."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "resumed"
    shutil.copytree(scratch_run / "checkpoints" / "step-6", run_dir / "checkpoints" / "step-6")
    assert train(scratch_config(tokenizer_dir, corpus, run_dir, "train.save_every=6", "train.resume=true"))
    straight, resumed = (load_file(d / "final" / "model.safetensors") for d in (scratch_run, run_dir))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_continued_pretraining_starts_from_the_scratch_model(scratch_run, tokenizer_dir, corpus, tmp_path):
    run_dir = tmp_path / "continued"
    cfg = scratch_config(tokenizer_dir, corpus, run_dir, "model.init=null", "model.tokenizer=null",
                         f"model.name_or_path={scratch_run / 'final'}", "train.max_steps=2")
    assert train(cfg)["steps"] == 2
    scratch, continued = step_losses(scratch_run), step_losses(run_dir)
    assert continued[0] < 0.8 * scratch[0]  # the learned weights, not a fresh start near ln(V)
    assert continued[0] == pytest.approx(scratch[-1], rel=0.25)


@pytest.mark.parametrize("overrides, message", [
    (["model.name_or_path=some/model"], "model.init and model.name_or_path"),
    (["model.tokenizer=null"], "model.tokenizer: model.init builds a new model"),
    (["strategy.name=lora"], "strategy.name: 'lora' adapts a pretrained model"),
    (["train.objective=reward"], "train.objective: reward puts a new head"),
    (["model.init.num_heads=3"], "model.init.hidden_size: 32 must be a multiple of model.init.num_heads"),
    (["model.init.num_kv_heads=3"], "model.init.num_kv_heads: 3 must divide"),
    (["model.init.max_position_embeddings=32"], "model.init.max_position_embeddings: 32 is less than"),
])
def test_init_config_errors_name_the_keys(overrides, message, tokenizer_dir, corpus, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        scratch_config(tokenizer_dir, corpus, tmp_path / "run", *overrides)


def test_vocab_size_smaller_than_the_tokenizer_is_refused(tokenizer_dir, corpus, tmp_path):
    cfg = scratch_config(tokenizer_dir, corpus, tmp_path / "run", "model.init.vocab_size=100")
    tokenizer, _ = build_tokenizer(cfg)
    with pytest.raises(ConfigError, match=f"model.init.vocab_size: 100 is smaller than the tokenizer \\({VOCAB}"):
        build_model(cfg, tokenizer, [])
