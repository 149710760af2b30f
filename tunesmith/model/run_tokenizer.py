"""Config -> the run's tokenizer: loaded, its chat template installed, a pad token given where it has none.

Light on purpose (no torch, no transformers at import): `prepare` builds its tokenizer here, and with `light=True`
reads it through `tokenizers` alone where that gives transformers' ids (model/light_tokenizer.py).
"""

from __future__ import annotations

import logging

from tunesmith.config import Config
from tunesmith.config.objectives import OBJECTIVES
from tunesmith.data.templates import install_template
from tunesmith.model.sources import resolve_model_path

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"


def build_tokenizer(cfg: Config, light: bool = False):
    """The tokenizer with its chat template and a pad token; returns it and the template tokens it gained.

    Args:
        light: read a local tokenizer without transformers where possible (`light_tokenizer`): for commands that
            only tokenize. Training and evaluation use transformers' tokenizer, which a model's tools expect.
    """
    m = cfg.model
    tokenizer = _light(cfg) if light else None
    if tokenizer is None:
        from tunesmith.model.load import load_tokenizer

        tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, m.revision, m.trust_remote_code)
    # Plain text (clm) and text + label rows (classify) are never rendered as chat.
    added = install_template(tokenizer, cfg.data.template) if OBJECTIVES[cfg.train.objective].chat_template else []
    if added:
        log.info("added template tokens to the vocabulary: %s", ", ".join(added))
    ensure_pad_token(tokenizer)
    return tokenizer, added


def _light(cfg: Config):
    """The light tokenizer of a local directory (no revision, no remote code), or None."""
    from pathlib import Path

    from tunesmith.model.light_tokenizer import load_light_tokenizer

    m = cfg.model
    source = m.tokenizer or m.name_or_path
    if m.revision or m.trust_remote_code:
        return None
    path = Path(resolve_model_path(source))
    return load_light_tokenizer(path) if path.is_dir() else None


def ensure_pad_token(tokenizer) -> bool:
    """Give a tokenizer without a pad token a dedicated one, never reusing EOS.

    Batches mask labels explicitly, so the pad id never hides a real EOS; a dedicated token also keeps
    generation and other tools from confusing padding with end-of-text. The model's embeddings must then
    cover the tokenizer (`resize_embeddings`). Returns True if a token was added.
    """
    if tokenizer.pad_token is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    log.info("the tokenizer had no pad token: added %s (id %d)", PAD_TOKEN, tokenizer.pad_token_id)
    return True
