"""Config -> the run's tokenizer and the `transformers` config of its model: what every command that reads a
config needs before (or instead of) a model.

`prepare` and `estimate` ask here rather than the training module, so they start without importing the training
stack (accelerate, peft, the objectives): preparing data needs a tokenizer, not a trainer.
"""

from __future__ import annotations

import logging

from tunesmith.config import Config
from tunesmith.data.templates import install_template
from tunesmith.errors import ConfigError
from tunesmith.model.load import ensure_pad_token, load_tokenizer
from tunesmith.model.scratch import architecture_config
from tunesmith.model.sources import resolve_model_path

log = logging.getLogger(__name__)


def build_tokenizer(cfg: Config):
    """The tokenizer with its chat template and a pad token; returns it and the template tokens it gained."""
    m = cfg.model
    tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, m.revision, m.trust_remote_code)
    # Plain text (clm) and text + label rows (classify) are never rendered as chat.
    added = install_template(tokenizer, cfg.data.template) if cfg.train.objective not in ("clm", "classify") else []
    if added:
        log.info("added template tokens to the vocabulary: %s", ", ".join(added))
    ensure_pad_token(tokenizer)
    return tokenizer, added


def architecture(cfg: Config, tokenizer):
    """The `transformers` config of the run's model: built from model.init for `tokenizer`, else the checkpoint's.

    Raises:
        ConfigError when model.init.vocab_size is smaller than the tokenizer.
    """
    m = cfg.model
    if m.init is None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model_path(m.name_or_path), revision=m.revision,
                                          trust_remote_code=m.trust_remote_code)
    i = m.init
    if i.vocab_size is not None and i.vocab_size < len(tokenizer):
        raise ConfigError(f"model.init.vocab_size: {i.vocab_size} is smaller than the tokenizer ({len(tokenizer)} "
                          "tokens); raise it or leave it null (the tokenizer's length)")
    # The pad id becomes the embedding's padding_idx (a zero row that never trains): only a dedicated pad token
    # may have it, never an EOS or BOS that a tokenizer also uses for padding.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id) \
        else None
    return architecture_config(
        i.family, i.vocab_size or len(tokenizer), i.hidden_size, i.num_layers, i.num_heads, i.num_kv_heads,
        i.intermediate_size, i.max_position_embeddings, i.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
    )
