"""Which tokens end generation: the one answer that training, eval, chat, serve, RL rollouts, merge and export ask.

A model stops at its EOS token and, when its tokenizer has a chat template, at the token that ends an assistant
turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>` ...). `set_stop_tokens` writes that set into the model's
`generation_config.eos_token_id` -- the field `generate`, the serve engine, `save_pretrained` and the GGUF
writer all read -- and `stop_token_ids` reads it back, so every path stops on the same ids.

An end-of-turn marker that the tokenizer splits into several tokens (a hand-written template, e.g. "### End")
cannot be one stop id: stopping at its first token would cut answers that merely contain that token. Such a
marker adds no stop id (generation stops at EOS); a warning says so once per marker. The built-in templates add
their markers to the vocabulary as single tokens, so this never happens to a model tuned with one.

    stops = set_stop_tokens(model, tokenizer)   # e.g. [2, 32001]: EOS and <|im_end|>
    stops == stop_token_ids(model)
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunesmith.data.templates import end_of_turn_marker
from tunesmith.errors import DataError, ModelError

log = logging.getLogger(__name__)
_warned_markers: set[str] = set()


def end_of_turn_id(tokenizer) -> int | None:
    """The single token that ends an assistant turn in the tokenizer's chat template; None when there is no
    template or its marker is several tokens (warned once)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        marker = end_of_turn_marker(tokenizer)
    except DataError:
        return None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    if marker not in _warned_markers:
        _warned_markers.add(marker)
        log.warning("the chat template's end-of-turn marker %r is %d tokens, not one: generation stops at EOS "
                    "only (a built-in data.template adds its marker as a single token)", marker, len(ids))
    return None


def set_stop_tokens(model, tokenizer, generation_dir: Path | None = None) -> list[int]:
    """Make generation stop at EOS and at the chat template's end-of-turn token.

    Args:
        model: a transformers model or a PEFT / ReFT wrapper around one (the inner model's config is set).
        tokenizer: the tokenizer the model was trained with.
        generation_dir: a directory whose generation_config.json training saved; its stop ids come first.
    Returns:
        The stop ids, in the order: saved generation config, tokenizer EOS, end-of-turn.
    Raises:
        ModelError when there is none: generation would never stop.
    """
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if generation_dir is not None:
        inner.generation_config = GenerationConfig.from_pretrained(str(generation_dir))
    ids = _as_list(inner.generation_config.eos_token_id)
    for extra in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    if not ids:
        raise ModelError("the model has no EOS token and the tokenizer no end-of-turn token: generation "
                         "would never stop")
    inner.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tokenizer.pad_token_id is not None:
        inner.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids


def stop_token_ids(model) -> list[int]:
    """The ids generation stops at (what `set_stop_tokens` wrote, or the checkpoint's own EOS).

    Raises:
        ModelError when the model's generation_config names none: generation would never stop.
    """
    ids = _as_list(model.generation_config.eos_token_id)
    if not ids:
        raise ModelError("the model's generation_config has no eos_token_id, so generation would never stop")
    return ids


def _as_list(eos) -> list[int]:
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
