"""Batched generation (greedy or sampled): chat conversations through the tokenizer's chat template, or plain
text prompts.

The prompt of a conversation is exactly what training supervised against:
`apply_chat_template(messages, add_generation_prompt=True)` tokenised without extra special tokens (the
template writes BOS itself when it wants one). Prompts are decoded together as the server decodes them
(`tunesmith.model.decode`: continuous batching, a KV cache row per prompt); generation stops at the model's
`generation_config.eos_token_id` (one id or several).

    answers = generate_greedy(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=16)
    endings = complete_greedy(model, tokenizer, ["The capital of Veloria is"], max_new_tokens=4)
"""

from __future__ import annotations

from typing import Sequence

import torch

from tunesmith.data.batching import left_pad
from tunesmith.data.templates import render_marked
from tunesmith.data.tokenize import encode_rendered
from tunesmith.model.decode import Row, Sampling, decode
from tunesmith.model.stops import stop_token_ids

Conversation = Sequence[dict[str, str]]


def prompt_ids(tokenizer, messages: Conversation) -> list[int]:
    """Token ids of the prompt that asks the model for the next assistant turn, encoded as training encodes it:
    text in the messages that spells a control token stays ordinary text (see `tokenize.encode_rendered`), so a
    user cannot forge a turn; otherwise the ids equal `apply_chat_template(..., add_generation_prompt=True)`."""
    return encode_rendered(tokenizer, render_marked(tokenizer, messages, add_generation_prompt=True))


def generate_greedy(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[str]:
    """The greedy continuation of each conversation, cut before the first stop token.

    Args:
        model: a causal LM (or a PEFT model around one); its generation_config.eos_token_id says where to stop.
        conversations: lists of {"role", "content"} turns, each ending before the assistant turn to generate.
        max_new_tokens: a continuation that has not stopped by then is returned as it is.
    Returns:
        One decoded string per conversation (special tokens removed), in input order.
    """
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(model)[0]
    new_ids = greedy_token_ids(model, prompts, pad, max_new_tokens, batch_size)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def complete_greedy(model, tokenizer, texts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32
                    ) -> list[str]:
    """Greedy continuations of plain-text prompts (no chat template), cut before the first stop token.

    Prompts are tokenised as training tokenises a raw document (`add_special_tokens=True`: BOS where the
    tokenizer adds one), without the EOS that ends a document.

    Returns:
        One decoded string per prompt (special tokens removed), in input order.
    """
    prompts = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(model)[0]
    new_ids = greedy_token_ids(model, prompts, pad, max_new_tokens, batch_size)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def greedy_token_ids(
    model, prompts: Sequence[list[int]], pad_token_id: int, max_new_tokens: int = 32, batch_size: int = 32
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each without its stop token and anything after it.

    Args:
        prompts: token ids per prompt (any lengths; batched with left padding).
        pad_token_id: fills the left padding (masked out, so any id works).
    Returns:
        The new token ids per prompt, in input order.
    """
    return generate_token_ids(model, prompts, pad_token_id, max_new_tokens, batch_size)


@torch.no_grad()
def generate_token_ids(
    model,
    prompts: Sequence[list[int]],
    pad_token_id: int,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Continuations of token-id prompts, greedy (temperature 0) or sampled, each cut before its stop token.

    Decoded as the server decodes (`tunesmith.model.decode`, continuous batching): at most `batch_size` prompts
    at once, the next waiting prompt taking the place of one that has finished. A PEFT prompt-learning adapter
    (prompt or prefix tuning) puts virtual tokens before the prompt, which only PEFT's own `generate` knows how to
    do: such a model generates through it, `batch_size` prompts at a time.

    Sampling is repeatable after `torch.manual_seed`: each prompt's random stream is seeded from torch's global
    generator.

    Args:
        prompts: token ids per prompt (any lengths).
        pad_token_id: fills the left padding (masked out, so any id works).
        temperature: 0 for greedy decoding, else the softmax temperature of sampling.
        top_p: nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p.
    Returns:
        The new token ids per prompt, in input order.
    """
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1, got {temperature}, "
                         f"{top_p}, {max_new_tokens}")
    stops = stop_token_ids(model)
    was_training = model.training
    model.eval()
    try:
        if _is_prompt_learning(model):
            return _peft_generate(model, prompts, pad_token_id, max_new_tokens, batch_size, temperature, top_p)
        seeds = torch.randint(2**62, (len(prompts),)).tolist()  # from the global generator: manual_seed repeats
        rows = [Row(list(p), max_new_tokens, Sampling(temperature, top_p, seed)) for p, seed in zip(prompts, seeds)]
        new_ids: list[list[int]] = [[] for _ in prompts]
        for step in decode(model, rows, stops, pad_token_id, max_rows=batch_size):
            for index, token, reason in step:
                if reason != "stop":
                    new_ids[index].append(token)
        return new_ids
    finally:
        model.train(was_training)


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return config is not None and config.is_prompt_learning


def _peft_generate(model, prompts: Sequence[list[int]], pad_token_id: int, max_new_tokens: int, batch_size: int,
                   temperature: float, top_p: float) -> list[list[int]]:
    """PEFT's `generate` on left-padded batches of `batch_size` prompts (for prompt-learning adapters)."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_token_id,
                              **sampling)
    device = next(model.parameters()).device
    new_ids = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_pad(prompts[start:start + batch_size], pad_token_id)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)  # (B, T + new)
        new_ids += [_cut_at_stop(row, stops) for row in out[:, input_ids.shape[1]:].tolist()]
    return new_ids


def _cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    # Rows that stopped early are padded by generate; the first stop id marks where the answer ends.
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return ids[:cut]
