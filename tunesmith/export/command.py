"""`tunesmith export`: a model (or a run / adapter, merged on the way) as a Hugging Face directory or a GGUF file.

    tunesmith export runs/x --output out/x-hf                           # merged, sharded safetensors + tokenizer
    tunesmith export runs/x --output out/x.gguf --format gguf --quant q8_0
"""

from __future__ import annotations

import logging
from pathlib import Path


from tunesmith.errors import ConfigError
from tunesmith.export.hf import check_output_dir, check_shard_size, save_hf
from tunesmith.model.loading import load_model_and_tokenizer
from tunesmith.model.resolve import require_generative, resolve_source
from tunesmith.export.merge import merge_source, output_dtype, summary_line
from tunesmith.model.sources import resolve_model_path

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")


def export_command(model: str, output: str, fmt: str = "hf", quant: str = "f16", max_shard_size: str = "5GB",
                   allow_pickle: bool = False, base: str | None = None) -> Path:
    """Export `model` (a model, run or adapter directory; adapters are merged first).

    Args:
        output: a new directory (hf) or a new .gguf file (gguf).
        fmt: "hf" or "gguf".
        quant: GGUF tensor type: "f32", "f16" or "q8_0" (hf keeps the checkpoint's dtype).
        max_shard_size: hf: split the safetensors above this size, e.g. "5GB".
    Returns:
        The path written.
    """
    out = Path(output)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "hf":
        check_output_dir(out)
        check_shard_size(max_shard_size)
    else:
        _check_gguf_path(out)
    src = resolve_source(model, base)
    require_generative(src)
    if fmt == "gguf":
        _check_gguf_architecture(src.weights)
    if src.adapter is not None:
        merged, tokenizer, report = merge_source(src, allow_pickle)
        report["saved_dtype"] = quant if fmt == "gguf" else str(output_dtype("auto", src.weights))
        log.info(summary_line(report, out))
    else:
        merged, tokenizer = load_model_and_tokenizer(src, dtype="fp32", allow_pickle=allow_pickle)
    if fmt == "hf":
        save_hf(merged, tokenizer, out, max_shard_size, dtype=output_dtype("auto", src.weights))
    else:
        from tunesmith.export.to_gguf import write_gguf

        _require_gguf()
        write_gguf(merged, tokenizer, out, quant)
    print(f"exported {model} -> {out} ({fmt}{', ' + quant if fmt == 'gguf' else ''})")
    return out


def _check_gguf_path(out: Path) -> None:
    if out.suffix != ".gguf":
        raise ConfigError(f"--output: {out} should be a file name ending in .gguf for --format gguf")
    if out.exists():
        raise ConfigError(f"--output: {out} already exists; choose a new file")
    if not out.parent.is_dir():
        raise ConfigError(f"--output: the directory {out.parent} does not exist")


def _check_gguf_architecture(weights: str) -> None:
    """Before seconds of loading: is the architecture one GGUF export writes?"""
    from transformers import AutoConfig

    from tunesmith.export.to_gguf import gguf_architecture

    _require_gguf()
    gguf_architecture(AutoConfig.from_pretrained(resolve_model_path(weights)).model_type)


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError('--format gguf needs the gguf package: pip install "tunesmith[export]"') from None


