"""A tokenizer read with `tokenizers` and `jinja2` alone, for the commands that only tokenize (`prepare`).

`transformers` 5 imports torch as soon as it loads any tokenizer (~3 s of CPU on a small machine, most of
`tunesmith prepare` on a small file). What the data pipeline asks of a tokenizer (ids with or without the
special tokens around them, the chat template rendered, the special tokens and the added ones) is the Rust
tokenizer in `tokenizer.json` plus a few fields of `tokenizer_config.json`, so this reads those two files the way
`transformers.TokenizersBackend` does and renders the template in the same sandbox with the same helpers.

It is used only where it gives transformers' ids by construction: a local directory whose tokenizer class is
the generic one (`TokenizersBackend`, what transformers 5 saves; `PreTrainedTokenizerFast`, what 4.x saved)
and whose tokenizer_config.json holds nothing that changes encoding beyond tokenizer.json (`add_bos_token` or
`add_eos_token` make transformers rebuild the post-processor; a model-specific class such as `GemmaTokenizer`
rebuilds the pipeline in code). `load_light_tokenizer` returns None for anything else and the caller loads
transformers' tokenizer. tests/test_light_tokenizer.py compares both on the tiny tokenizers and SmolLM2's.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that leave encoding and rendering as tokenizer.json and the template define them
INERT_KEYS = frozenset({
    "backend", "tokenizer_class", "model_max_length", "is_local", "local_files_only", "clean_up_tokenization_spaces",
    "added_tokens_decoder", "chat_template", "padding_side", "truncation_side", "model_input_names",
    "extra_special_tokens", "additional_special_tokens", *SPECIAL_ATTRIBUTES,
})


def load_light_tokenizer(path: str | Path) -> LightTokenizer | None:
    """The tokenizer of a local directory, when it can be read without transformers (see the module's text)."""
    folder = Path(path)
    config_file, tokenizer_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (config_file.is_file() and tokenizer_file.is_file()):
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in GENERIC_CLASSES or set(config) - INERT_KEYS:
        return None
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    if template is not None and not isinstance(template, str):  # named templates: transformers' own handling
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_file))
    # Padding and truncation saved in tokenizer.json are call options: transformers turns them off for a call
    # that does not ask for them, as every call here is.
    backend.no_padding()
    backend.no_truncation()
    return LightTokenizer(backend, config, template, str(folder))


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's fields (4.x)."""
    return token.get("content") if isinstance(token, dict) else token


class LightTokenizer:
    """The part of a `transformers` tokenizer's interface the data pipeline uses, on a `tokenizers.Tokenizer`."""

    def __init__(self, backend, config: dict, chat_template: str | None, name_or_path: str):
        from tokenizers import AddedToken

        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        self._special = {a: _content(config.get(a)) for a in SPECIAL_ATTRIBUTES if config.get(a) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self._extra = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        # What transformers adds on loading: the config's added tokens, then any special token not yet added.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        entries = [entry for _, entry in sorted((config.get("added_tokens_decoder") or {}).items(),
                                                key=lambda kv: int(kv[0]))]
        entries += [{"content": t, "special": True} for t in [*self._special.values(), *self._extra]]
        for entry in entries:
            entry = entry if isinstance(entry, dict) else {"content": entry, "special": True}
            if entry["content"] in known:
                continue
            fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
            token = AddedToken(entry["content"], **fields)
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
            known.add(entry["content"])

    # ------------------------------------------------------------------------------------------ encoding

    def __call__(self, text, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        """{"input_ids": ids} for a string, or a list of them for a list of strings."""
        backend = self.backend_tokenizer
        backend.encode_special_tokens = split_special_tokens
        try:
            if isinstance(text, str):
                return {"input_ids": backend.encode(text, add_special_tokens=add_special_tokens).ids}
            return {"input_ids": [e.ids for e in backend.encode_batch(list(text),
                                                                      add_special_tokens=add_special_tokens)]}
        finally:
            backend.encode_special_tokens = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation, tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs):
        """The conversation rendered by the chat template as transformers renders it (its ids with `tokenize`)."""
        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template")
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in conversation]
        text = _compiled(self.chat_template).render(
            messages=_alias_reasoning(messages), tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------------------------------ vocabulary

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        """Ids of tokens; an unknown token is the unk token's id (None without one), as in transformers."""
        if isinstance(tokens, str):
            found = self.backend_tokenizer.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend_tokenizer.get_added_tokens_decoder()

    def add_tokens(self, tokens, special_tokens: bool = False) -> int:
        from tokenizers import AddedToken

        tokens = [t if isinstance(t, AddedToken) else AddedToken(t, special=special_tokens) for t in tokens]
        return self.backend_tokenizer.add_special_tokens(tokens) if special_tokens \
            else self.backend_tokenizer.add_tokens(tokens)

    def add_special_tokens(self, tokens: dict[str, str]) -> int:
        """Named special tokens (e.g. {"pad_token": "<|pad|>"}), added to the vocabulary where new."""
        for attribute, token in tokens.items():
            if attribute not in SPECIAL_ATTRIBUTES:
                raise ValueError(f"{attribute!r} is not a named special token")
            self._special[attribute] = str(token)
        return self.add_tokens([str(t) for t in tokens.values()], special_tokens=True)

    # ------------------------------------------------------------------------------------------ special tokens

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {a: self._special[a] for a in SPECIAL_ATTRIBUTES if self._special.get(a) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens, then the extra ones, each once (transformers' order)."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self._extra]))

    def __getattr__(self, name: str):
        """`bos_token`, `bos_token_id`, ... for every named special token (None when the tokenizer has none)."""
        attribute = name[: -len("_id")] if name.endswith("_token_id") else name
        if attribute not in SPECIAL_ATTRIBUTES:
            raise AttributeError(name)
        token = self.__dict__.get("_special", {}).get(attribute)
        if token is None or attribute == name:
            return token
        return self.backend_tokenizer.token_to_id(token)

    def __setattr__(self, name: str, value) -> None:
        if name in SPECIAL_ATTRIBUTES:
            self._special[name] = value
        else:
            object.__setattr__(self, name, value)


# ---------------------------------------------------------------------------------------------- templates


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """A message's reasoning under every name templates read it by (as transformers passes it)."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning")
                          if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message,
                                                       "reasoning_content": reasoning})
    return out


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled in the environment transformers renders chat templates in: an immutable sandbox,
    trimmed blocks, loop controls, `{% generation %}` (a no-op when not tracking replies), JSON without HTML
    escaping, `raise_exception`, `strftime_now`, and `dict`/`namespace` that refuse private attributes."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=Dict(), namespace=Namespace)
    return env.from_string(template)
