"""Built-in chat templates for tokenizers that have none, and the helpers that render them.

Each template is Jinja, installed as `tokenizer.chat_template`, so training, evaluation, chat and the saved
tokenizer all render conversations the same way. Assistant turns end with an end-of-turn token that is
supervised, so the tuned model learns to stop.

Message content is data, never markup: text in it that spells a control token (`<|im_start|>`, `<|eot_id|>`,
the EOS token ...) must not become that token, or a row or a request could forge a turn. `render_marked` wraps
such text in two private marks before rendering, and `tokenize.encode_rendered` encodes what the marks enclose
as ordinary text; the template's own control tokens stay tokens.
"""

from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass

from jinja2 import TemplateError

from tunesmith.errors import ConfigError, DataError


@dataclass(frozen=True)
class Template:
    jinja: str
    special_tokens: tuple[str, ...]  # must exist in the vocabulary as single special tokens
    end_of_turn: str | None  # None: the tokenizer's eos_token


CHATML = Template(
    jinja=(
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
)

LLAMA3 = Template(
    jinja=(
        "{{- '<|begin_of_text|>' -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    end_of_turn="<|eot_id|>",
)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA = Template(
    jinja=(
        "{{- bos_token if bos_token and bos_token != eos_token else '' -}}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{{- messages[0]['content'] + '\\n\\n' -}}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{{- '" + ALPACA_PREAMBLE + "\\n\\n' -}}{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' -}}"
        "{%- else -%}"
        "{{- message['content'] + eos_token + '\\n\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    special_tokens=(),
    end_of_turn=None,
)

# Gemma's own turn format (Gemma 2 and 3 instruction-tuned models use it; the base models ship without a
# template, and this is the one users give them): roles `user` and `model`, no system role (a system message is
# put at the start of the first user turn), `<end_of_turn>` after every turn. Its markers are already in Gemma's
# vocabulary, so nothing is added to it and the embeddings keep their size.
GEMMA = Template(
    jinja=(
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content']"
        " + '<end_of_turn>\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
    ),
    special_tokens=("<start_of_turn>", "<end_of_turn>"),
    end_of_turn="<end_of_turn>",
)

TEMPLATES: dict[str, Template] = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "gemma": GEMMA}
# Templates that begin with the tokenizer's BOS when its own encoding adds one (Gemma's `tok("hi")` is
# [<bos>, hi]): a rendered conversation is encoded without special tokens, so the BOS must be in the text.
# llama3 writes its own `<|begin_of_text|>`; alpaca writes the BOS whenever there is one distinct from EOS.
BOS_WHEN_ENCODED = ("chatml", "gemma")


def install_template(tokenizer, name: str | None) -> list[str]:
    """Set the tokenizer's chat template (a built-in by name, or keep its own when `name` is None).

    Returns:
        The special tokens that had to be added to the vocabulary (the model's embeddings must grow
        to cover them).
    """
    if name is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.template: the tokenizer has no chat template; set data.template to one of "
                + ", ".join(TEMPLATES)
            )
        return []
    template = TEMPLATES[name]
    if template.end_of_turn is None and tokenizer.eos_token is None:
        raise ConfigError(f"data.template: {name!r} ends turns with the EOS token, but the tokenizer has none")
    missing = [t for t in template.special_tokens if not _is_single_token(tokenizer, t)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    bos = name in BOS_WHEN_ENCODED and adds_bos(tokenizer)
    tokenizer.chat_template = ("{{- bos_token -}}" if bos else "") + template.jinja
    return missing


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts a text with its BOS token (Llama 2, Gemma: yes; GPT-2, Qwen:
    no)."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def _is_single_token(tokenizer, token: str) -> bool:
    # Being in the vocabulary is not enough: a plain BPE entry "<|im_end|>" is never produced, because
    # the pre-tokenizer splits the text into "<|", "im", ... before the model sees it.
    token_id = tokenizer.get_vocab().get(token)
    return token_id is not None and tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as `apply_chat_template(..., tokenize=False)` gives it.

    Raises:
        DataError when the template refuses the conversation (e.g. its `raise_exception` on a role order) or
        fails on it: a template is code from the tokenizer's files, so any error in it (a syntax error, a
        division by zero, a type error, the sandbox's limits) is reported as the template's, never as a crash.
    """
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise DataError(f"the chat template cannot render this conversation: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the template's own code failed (see above)
        raise DataError(f"the chat template cannot render this conversation: {type(exc).__name__}: {exc}") from None


# Two Unicode noncharacters (reserved for a program's internal use, never assigned to a character) enclose
# control-token text found in message content; any already in the content are removed first, so content
# cannot mark (and so disarm) a token the template writes itself.
MARK_START, MARK_END = "\ufdd0", "\ufdd1"


def control_tokens(tokenizer) -> tuple[str, ...]:
    """Texts that stay ordinary text inside message content: the tokenizer's special tokens and the added tokens
    its chat template writes (whitespace tokens aside), longest first, so a token wins over one inside it.

    Memoised per tokenizer (listing its added tokens takes ~1 ms with Llama 3's 256) until its vocabulary size,
    special tokens or template change."""
    template = getattr(tokenizer, "chat_template", None) or ""
    template = "".join(template.values()) if isinstance(template, dict) else template
    key = (len(tokenizer), template, tuple(tokenizer.all_special_tokens))
    cached = _CONTROL_TOKENS.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special or t.content in template}
    tokens = {t for t in added | set(tokenizer.all_special_tokens) if t.strip()}
    result = tuple(sorted(tokens, key=lambda t: (-len(t), t)))
    _CONTROL_TOKENS[tokenizer] = (key, result)
    return result


_CONTROL_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (key, control tokens)


@functools.lru_cache(maxsize=64)
def control_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Matches any of `tokens` (a `control_tokens` tuple)."""
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


def mark_control_text(tokenizer, messages) -> list[dict]:
    """The messages with every control token in their strings (content, role, text parts of list content: every
    value, at any depth, but not dict keys) enclosed in MARK_START ... MARK_END."""
    pattern = control_pattern(control_tokens(tokenizer))

    def mark(value):
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, value)
        if isinstance(value, dict):
            return {key: mark(v) for key, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [mark(v) for v in value]
        return value

    return [mark(dict(m)) for m in messages]


def render_marked(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """`render` of the messages with their control-token text marked: the text for `tokenize.encode_rendered`.
    Equal to `render` when no content holds control-token text (or a mark character)."""
    return render(tokenizer, mark_control_text(tokenizer, messages), add_generation_prompt)


def end_of_turn_marker(tokenizer) -> str:
    """The text a template puts after an assistant message's content (trailing whitespace removed).

    Found by rendering a probe conversation, so it also works for a tokenizer's own Jinja template.
    """
    probe = "\x00probe\x00"
    text = render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}])
    if probe not in text:
        raise DataError("the chat template does not render the assistant's content verbatim")
    marker = text.split(probe, 1)[1].strip()
    if not marker:
        raise DataError(
            "the chat template ends assistant turns with no end-of-turn or EOS token, so a tuned model would "
            "never learn to stop; set data.template to one of " + ", ".join(TEMPLATES)
        )
    return marker
