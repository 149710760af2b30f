"""The OpenAI API's request bodies (the fields tunesmith serves), its error bodies, and its response shapes.

Unknown fields are ignored, as OpenAI's API does; a known feature tunesmith does not implement (tools, logprobs,
penalties, JSON mode, echo ...) is refused with a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers  # extra response headers, e.g. Retry-After on 429 and 503

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", "stop")
        return stops


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Optional[object] = None
    response_format: Optional[dict] = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> list[str]:
        return _common_unsupported(self) + [
            name for name, used in (("logprobs", self.logprobs), ("top_logprobs", self.top_logprobs),
                                    ("tools", self.tools), ("tool_choice", self.tool_choice not in (None, "none")),
                                    ("response_format", (self.response_format or {}).get("type", "text") != "text"))
            if used]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # the API's default for completions
    echo: bool = False
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> list[str]:
        return _common_unsupported(self) + [
            name for name, used in (("echo", self.echo), ("suffix", self.suffix), ("logprobs", self.logprobs),
                                    ("best_of", (self.best_of or 1) > 1)) if used]


def _common_unsupported(request: _Sampling) -> list[str]:
    return [name for name, used in (("presence_penalty", request.presence_penalty != 0),
                                    ("frequency_penalty", request.frequency_penalty != 0),
                                    ("logit_bias", bool(request.logit_bias))) if used]


def parse(model: type[BaseModel], body: object) -> BaseModel:
    """Validate a JSON body; a 422 names the first bad field, e.g. `messages.0.role: Input should be ...`."""
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(422, f"{param}: {first['msg']}" if param else first["msg"], param) from None
    bad = request.unsupported()
    if bad:
        raise APIError(400, f"{bad[0]}: not supported by this server", bad[0], "unsupported_parameter")
    return request


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                         "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": use}


def text_completion(rid: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                        for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, index: int | None, delta: dict | None,
               reason: str | None = None, use: dict | None = None) -> dict:
    choices = [] if index is None else [{"index": index, "delta": delta, "finish_reason": reason,
                                         "logprobs": None}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, created: int, index: int | None, text: str,
                     reason: str | None = None, use: dict | None = None) -> dict:
    choices = [] if index is None else [{"index": index, "text": text, "finish_reason": reason,
                                         "logprobs": None}]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use}
