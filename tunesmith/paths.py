"""Where tunesmith keeps what it computes once (prepared data, converted GGUF models, the llama.cpp build):
$TUNESMITH_CACHE, by default ~/.cache/tunesmith. The lowest layer, so every package can ask it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith")
