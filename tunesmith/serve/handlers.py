"""The two generating routes: a request body in, a JSON reply or a stream of server-sent events out.

Streaming follows OpenAI's shape: `data: {chunk}` lines, a chunk per text delta, a final chunk per choice with
its finish_reason, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`. A client that
disconnects cancels its generations (they leave the batch at the next token).
"""

from __future__ import annotations

import json
import time

from tunesmith.errors import DataError
from tunesmith.eval.generate import prompt_ids
from tunesmith.serve.generation import Sampling
from tunesmith.serve.protocol import (APIError, ChatRequest, CompletionRequest, chat_chunk, chat_completion,
                                      completion_chunk, error_body, new_id, parse, text_completion)
from tunesmith.serve.service import Generation, Service


async def chat(service: Service, body: object):
    request = parse(ChatRequest, body)
    adapter = service.adapter_for(request.model)
    service.check_room()
    ids = chat_prompt(service, request)
    limit = service.max_new_tokens(request.token_limit(), len(ids),
                                   "max_completion_tokens" if request.max_completion_tokens else "max_tokens")
    generation = Generation(service, [ids], request.n, [limit], _sampling(request), request.stop_strings(),
                            adapter).start()
    rid = new_id("chatcmpl")
    if request.stream:
        return _sse(_chat_events(generation, rid, request), generation)
    texts, reasons = await _collect(generation)
    return chat_completion(rid, request.model, texts, reasons, generation.usage())


async def complete(service: Service, body: object):
    request = parse(CompletionRequest, body)
    adapter = service.adapter_for(request.model)
    service.check_room()
    prompts = completion_prompts(service, request.prompt)
    limits = [service.max_new_tokens(request.token_limit(), len(p), "max_tokens") for p in prompts]
    generation = Generation(service, prompts, request.n, limits, _sampling(request), request.stop_strings(),
                            adapter).start()
    rid = new_id("cmpl")
    if request.stream:
        return _sse(_completion_events(generation, rid, request), generation)
    texts, reasons = await _collect(generation)
    return text_completion(rid, request.model, texts, reasons, generation.usage())


def chat_prompt(service: Service, request: ChatRequest) -> list[int]:
    """The conversation through the chat template, ending with the assistant's turn to come."""
    tokenizer = service.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in request.messages]
    try:
        ids = prompt_ids(tokenizer, messages)
    except DataError as exc:
        raise APIError(400, f"messages: {exc}", "messages") from None
    service.check_prompt(ids, "messages")
    return ids


def completion_prompts(service: Service, prompt) -> list[list[int]]:
    """Token ids of each prompt: text is tokenised as a document starts (BOS where the tokenizer adds one)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: no prompt given", "prompt")
    prompts = [service.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
               for p in prompt]
    for ids in prompts:
        service.check_prompt(ids, "prompt")
    return prompts


def _sampling(request) -> Sampling:
    return Sampling(request.temperature, request.top_p, request.seed)


async def _collect(generation: Generation) -> tuple[list[str], list[str]]:
    texts, reasons = [""] * len(generation.jobs), [""] * len(generation.jobs)
    try:
        async for index, text, reason in generation.events():
            texts[index] += text
            if reason is not None:
                reasons[index] = reason
    finally:
        generation.cancel()
    return texts, reasons


async def _chat_events(generation: Generation, rid: str, request: ChatRequest):
    created = int(time.time())
    for index in range(len(generation.jobs)):
        yield chat_chunk(rid, request.model, created, index, {"role": "assistant", "content": ""})
    async for index, text, reason in generation.events():
        if text:
            yield chat_chunk(rid, request.model, created, index, {"content": text})
        if reason is not None:
            yield chat_chunk(rid, request.model, created, index, {}, reason)
    if request.stream_options and request.stream_options.include_usage:
        yield chat_chunk(rid, request.model, created, None, None, use=generation.usage())


async def _completion_events(generation: Generation, rid: str, request: CompletionRequest):
    created = int(time.time())
    async for index, text, reason in generation.events():
        yield completion_chunk(rid, request.model, created, index, text, reason)
    if request.stream_options and request.stream_options.include_usage:
        yield completion_chunk(rid, request.model, created, None, "", use=generation.usage())


def _sse(chunks, generation: Generation):
    """Server-sent events from an async iterator of dicts; an error mid-stream is sent as an error event, and a
    client that goes away cancels the generation."""
    from fastapi.responses import StreamingResponse

    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception as exc:  # the stream has started: report in-band
            yield f"data: {json.dumps(error_body(f'internal error: {type(exc).__name__}', 'server_error'))}\n\n"
        finally:
            generation.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
