"""One answer to "which tokens stop generation": training, eval, chat, serve and the exported model agree.

For every built-in template, and for a hand-written template whose end-of-turn marker is several tokens, a model
saved as training saves it is loaded by each delivery path; each must stop on the same ids.
"""

from __future__ import annotations

import copy
import logging

import gguf
import pytest
from transformers import GenerationConfig

from tunesmith.data.templates import TEMPLATES, install_template
from tunesmith.demo.tiny import build_model, save_tiny
from tunesmith.eval.models import load_for_eval
from tunesmith.export.command import export_command
from tunesmith.model.loading import load_model_and_tokenizer
from tunesmith.model.load import resize_embeddings
from tunesmith.model.stops import end_of_turn_id, set_stop_tokens, stop_token_ids
from tunesmith.serve.chat import ChatSession
from tunesmith.serve.service import load_service

# "### End" is four tokens of the test tokenizer: no single id can stand for it.
MULTI_TOKEN = ("{%- for message in messages -%}{{- message['role'] + ': ' + message['content'] + '\n### End\n' -}}"
               "{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}")


def _tuned(tmp_path, tokenizer, template: str):
    """A tiny model and tokenizer saved as a finished run's final/ is: template installed, stops set."""
    tok = copy.deepcopy(tokenizer)
    if template in TEMPLATES:
        install_template(tok, template)
    else:
        tok.chat_template = template
    model = build_model("llama", vocab_size=len(tok))
    resize_embeddings(model, tok)
    trained = set_stop_tokens(model, tok)
    return save_tiny(tmp_path / "final", model, tok), tok, trained


def _delivered_stops(path, tmp_path) -> dict[str, list[int]]:
    """The stop ids of each path a user takes to the model at `path`."""
    stops = {"eval": stop_token_ids(load_for_eval(str(path)).model)}
    model, tok = load_model_and_tokenizer(str(path))
    stops["chat"] = ChatSession(model, tok).stop_ids
    service = load_service(str(path))
    try:
        stops["serve"] = sorted(service.engine.stop_ids)
    finally:
        service.engine.close(grace=0)
    hf = export_command(str(path), str(tmp_path / "hf"), fmt="hf")
    eos = GenerationConfig.from_pretrained(str(hf)).eos_token_id
    stops["export hf"] = [eos] if isinstance(eos, int) else eos
    reader = gguf.GGUFReader(str(export_command(str(path), str(tmp_path / "m.gguf"), fmt="gguf", quant="f32")))
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")  # alpaca: EOS ends turns, eot == eos
    stops["export gguf"] = sorted({reader.fields[k].contents() for k in keys if k in reader.fields})
    return stops


@pytest.mark.parametrize("template", [*TEMPLATES, MULTI_TOKEN], ids=[*TEMPLATES, "multi-token"])
def test_every_path_stops_on_the_tokens_training_set(template, tokenizer, tmp_path):
    path, tok, trained = _tuned(tmp_path, tokenizer, template)
    eot = end_of_turn_id(tok)
    expected = sorted({tok.eos_token_id} | ({eot} if eot is not None else set()))
    assert sorted(trained) == expected
    for where, ids in _delivered_stops(path, tmp_path).items():
        assert sorted(ids) == expected, where


def test_a_multi_token_marker_is_no_stop_id_and_says_so_once(tokenizer, caplog):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MULTI_TOKEN.replace("### End", "### Finished here")  # a marker no other test warned about
    assert len(tok("### Finished here", add_special_tokens=False)["input_ids"]) > 1
    with caplog.at_level(logging.WARNING, logger="tunesmith.model.stops"):
        assert end_of_turn_id(tok) is None
        assert end_of_turn_id(tok) is None
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "stops at EOS only" in caplog.records[0].getMessage()


def test_a_single_token_marker_is_its_id(tokenizer):
    tok = copy.deepcopy(tokenizer)
    install_template(tok, "chatml")
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_no_stop_token_at_all_is_refused(tokenizer):
    from tunesmith.errors import ModelError

    model = build_model("llama", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None
    with pytest.raises(ModelError, match="never stop"):
        stop_token_ids(model)
