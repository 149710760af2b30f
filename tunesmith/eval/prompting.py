"""Prompts for evaluation: zero-shot, k-shot and chain of thought, as chat or as plain text.

An `Item` is one question of an eval set: its prompt (chat turns ending with the user's, or plain text as in
completion data), its reference answer and, for multiple choice, its options.

Chat prompts go through the tokenizer's chat template, exactly as training renders them: k-shot exemplars
are user/assistant turns before the question (the FLAN "chat" few-shot format, trained with only the last
turn supervised), and the ids are `apply_chat_template(messages, add_generation_prompt=True)`. A model
without a chat template (a base model) gets a plain-text prompt: exemplars written as prompt + answer,
separated by blank lines, then the question; it is tokenised like a completion prompt (with BOS).

Exemplars come from a separate file (a training file) and are drawn per question with a seed and the
question's content, so the draw does not depend on the order or size of the eval set. An exemplar whose
prompt equals the question's (after normalising case and whitespace) is never drawn: the item itself, or an
identical duplicate of it, cannot leak its answer into its own prompt.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence, Union

from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.generate import prompt_ids

Turns = tuple[dict[str, str], ...]
Prompt = Union[Turns, str]  # chat turns ending with the user's, or plain text
PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclass(frozen=True)
class Item:
    """One question: the prompt, the reference answer (for choice: the correct option) and the options."""

    source: str  # "file:line", for messages
    prompt: Prompt
    answer: str
    options: tuple[str, ...] = ()


def item_key(item: Item) -> str:
    """What makes two items the same question: their non-system prompt text, casefolded, whitespace collapsed."""
    if isinstance(item.prompt, str):
        text = item.prompt
    else:
        text = "\n".join(t["content"] for t in item.prompt if t["role"] != "system")
    return " ".join(text.casefold().split())


class FewShotPool:
    """Exemplars for k-shot prompts: distinct by `item_key`, drawn without the question being asked."""

    def __init__(self, items: Sequence[Item], k: int, seed: int = 0, source: str = "the few-shot file") -> None:
        if k < 1:
            raise ConfigError(f"few-shot: need k >= 1, got {k}")
        distinct: dict[str, Item] = {}
        for item in items:
            distinct.setdefault(item_key(item), item)
        self.items, self.keys = list(distinct.values()), list(distinct)
        self.key_set = frozenset(distinct)
        self.k, self.seed, self.source = k, seed, source

    def draw(self, query: Item) -> list[Item]:
        """k distinct exemplars, none with the query's prompt; the same query always gets the same ones."""
        key = item_key(query)
        has_query = int(key in self.key_set)
        if len(self.items) - has_query < self.k:
            raise DataError(f"{query.source}: {self.k}-shot needs {self.k} exemplars but {self.source} has only "
                            f"{len(self.items) - has_query} distinct prompts other than this one")
        digest = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        # one index more when the query is in the pool leaves k once it is dropped
        picks = rng.sample(range(len(self.items)), self.k + has_query)
        return [self.items[i] for i in picks if self.keys[i] != key][: self.k]


@dataclass(frozen=True)
class Prompter:
    """How the items of one eval set become prompt token ids.

    Args:
        prompt_format: "auto" (chat template for chat items when the tokenizer has one, else plain text),
            "chat" or "plain".
        fewshot: exemplars (None: zero-shot).
        cot_instruction: appended to every question (exemplars' too) for chain of thought; None: off.
        system_prompt: put first in chat prompts that have no system turn (as training does).
    """

    tokenizer: object
    prompt_format: str = "auto"
    fewshot: FewShotPool | None = None
    cot_instruction: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format: {self.prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
        if self.prompt_format == "chat" and not has_chat_template(self.tokenizer):
            raise ConfigError("prompt_format: 'chat' but the tokenizer has no chat template; set data.template "
                              "(chatml, llama3, alpaca, gemma) or use prompt_format: plain")

    def is_chat(self, item: Item) -> bool:
        if self.prompt_format == "auto":
            return has_chat_template(self.tokenizer) and not isinstance(item.prompt, str)
        return self.prompt_format == "chat"

    def prompt(self, item: Item) -> Prompt:
        """The full prompt of `item`: exemplars (if any), then the question."""
        shots = self.fewshot.draw(item) if self.fewshot else []
        if self.is_chat(item):
            return chat_prompt(item, shots, self.cot_instruction, self.system_prompt)
        return plain_prompt(item, shots, self.cot_instruction)

    def token_ids(self, item: Item) -> list[int]:
        return prompt_token_ids(self.tokenizer, self.prompt(item))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(item: Item, shots: Sequence[Item], cot_instruction: str | None = None,
                system_prompt: str | None = None) -> Turns:
    """[system], then per exemplar its user turns and its answer as the assistant's, then the question."""
    turns = _turns(item.prompt)
    system = [t for t in turns[:1] if t["role"] == "system"]
    if not system and system_prompt:
        system = [{"role": "system", "content": system_prompt}]
    messages = list(system)
    for shot in shots:
        messages += _with_instruction(_turns(shot.prompt, drop_system=True), cot_instruction)
        messages.append({"role": "assistant", "content": shot.answer})
    messages += _with_instruction(_turns(item.prompt, drop_system=True), cot_instruction)
    return tuple(messages)


def plain_prompt(item: Item, shots: Sequence[Item], cot_instruction: str | None = None) -> str:
    """Exemplars as prompt + answer, blank-line separated, then the question for the model to continue."""
    parts = [_join(_plain(shot.prompt, cot_instruction), shot.answer) for shot in shots]
    return "\n\n".join(parts + [_plain(item.prompt, cot_instruction)])


def prompt_token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Chat: the template with the generation prompt, tokenised without extra special tokens (the template
    writes BOS itself); plain text: tokenised as a completion prompt (with BOS where the tokenizer adds one)."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return prompt_ids(tokenizer, prompt)


def _turns(prompt: Prompt, drop_system: bool = False) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(t) for t in prompt if not (drop_system and t["role"] == "system")]


def _with_instruction(turns: list[dict[str, str]], instruction: str | None) -> list[dict[str, str]]:
    if instruction and turns:
        turns[-1] = {**turns[-1], "content": f"{turns[-1]['content']}\n\n{instruction}"}
    return turns


def _plain(prompt: Prompt, cot_instruction: str | None) -> str:
    # Chat turns as plain text: their contents, blank-line separated, and a line break for the answer.
    text = prompt if isinstance(prompt, str) else "\n\n".join(t["content"] for t in prompt) + "\n"
    return _join(text, cot_instruction) if cot_instruction else text


def _join(text: str, continuation: str) -> str:
    """`text` followed by `continuation`, with a space between unless one side already has whitespace."""
    if not text or text[-1].isspace() or continuation[:1].isspace():
        return text + continuation
    return f"{text} {continuation}"
