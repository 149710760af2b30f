"""Built-in chat templates for tokenizers that have none, and the helpers that render them.

Each template is Jinja, installed as `tokenizer.chat_template`, so training, evaluation, chat and the saved
tokenizer all render conversations the same way. Assistant turns end with an end-of-turn token that is
supervised, so the tuned model learns to stop.
"""

from __future__ import annotations

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

TEMPLATES: dict[str, Template] = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA}


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
    tokenizer.chat_template = template.jinja
    return missing


def _is_single_token(tokenizer, token: str) -> bool:
    # Being in the vocabulary is not enough: a plain BPE entry "<|im_end|>" is never produced, because
    # the pre-tokenizer splits the text into "<|", "im", ... before the model sees it.
    token_id = tokenizer.get_vocab().get(token)
    return token_id is not None and tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as `apply_chat_template(..., tokenize=False)` gives it.

    Raises:
        DataError when the template refuses the conversation (e.g. its `raise_exception` on a role order).
    """
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise DataError(f"the chat template cannot render this conversation: {exc}") from None


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
