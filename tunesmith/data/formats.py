"""Read JSONL training files and normalise every row to one internal shape.

Chat-like rows (OpenAI `messages`, ShareGPT `conversations`, alpaca `instruction`/`input`/`output`) become
`{"messages": [{"role": ..., "content": ...}, ...]}`; raw text rows become `{"text": ...}`.
Every problem is reported as `file:line: field: problem`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.errors import DataError

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
FORMATS = ("messages", "alpaca", "text")


@dataclass(frozen=True)
class Row:
    """A normalised example and where it came from (for error messages)."""

    source: str  # "file:line"
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; invalid JSON or UTF-8 names the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors)
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {exc.start}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                hint = " (JSON Lines: one object per line, not an array)" if isinstance(obj, list) else ""
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}{hint}")
            yield lineno, obj


def detect_format(obj: dict[str, Any]) -> str | None:
    if "messages" in obj or "conversations" in obj:
        return "messages"
    if "instruction" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def load_rows(path: str | Path, fmt: str = "auto", system_prompt: str | None = None) -> list[Row]:
    """Read and normalise every row of a JSONL file.

    Args:
        path: a JSONL file.
        fmt: "auto" (decided from the first row's fields), "messages", "alpaca" or "text".
        system_prompt: prepended as a system turn to chat rows that have none.
    Raises:
        DataError naming file, line and field for the first bad row, or an empty file.
    """
    if fmt not in ("auto",) + FORMATS:
        raise DataError(f"{path}: unknown data format {fmt!r} (expected 'auto', {', '.join(map(repr, FORMATS))})")
    rows: list[Row] = []
    detected_at = None  # where "auto" decided the format of the file
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if fmt == "auto":
            fmt, detected_at = _detect_or_fail(obj, where), where
        own = detect_format(obj)
        if detected_at and own and own != fmt:
            raise DataError(f"{where}: this row is in {own!r} format but the file is {fmt!r} (decided by "
                            f"{detected_at}); use one format per file")
        rows.append(_normalise(obj, fmt, where, system_prompt))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def _detect_or_fail(obj: dict[str, Any], where: str) -> str:
    fmt = detect_format(obj)
    if fmt is None:
        raise DataError(
            f"{where}: cannot tell the format from fields {sorted(obj)}; expected 'messages', "
            "'conversations', 'instruction' (alpaca) or 'text', or set data.format"
        )
    return fmt


def _normalise(obj: dict[str, Any], fmt: str, where: str, system_prompt: str | None) -> Row:
    """One row of format `fmt` as a Row; chat rows without a system turn get `system_prompt` first."""
    if fmt == "text":
        return Row(where, text=_text_field(obj, "text", where))
    messages = _alpaca_messages(obj, where) if fmt == "alpaca" else _chat_messages(obj, where)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Row(where, messages=tuple(messages))


def _text_field(obj: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: {key}: missing field")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key}: expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: {key}: empty")
    return value


def _alpaca_messages(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    instruction = _text_field(obj, "instruction", where)
    extra = _text_field(obj, "input", where, required=False)
    output = _text_field(obj, "output", where)
    messages = []
    system = _text_field(obj, "system", where, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    messages += _alpaca_history(obj.get("history"), where)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _alpaca_history(history: Any, where: str) -> list[dict[str, str]]:
    """LLaMA-Factory's alpaca `history`: earlier [instruction, response] pairs, as turns before this one."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(f"{where}: history: expected a list of [instruction, response] pairs")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(f"{where}: history[{i}]: expected an [instruction, response] pair, got {pair!r:.60}")
        turns.append({"role": "user", "content": _content_text(pair[0], where, f"history[{i}][0]")})
        turns.append({"role": "assistant", "content": _content_text(pair[1], where, f"history[{i}][1]")})
    return turns


def _chat_messages(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" not in obj and "conversations" not in obj:
        raise DataError(f"{where}: messages: missing field (or ShareGPT 'conversations')")
    key = "messages" if "messages" in obj else "conversations"
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key}: expected a non-empty list of turns, got {_describe(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field}: expected an object, got {type(turn).__name__}")
        role_key = "role" if "role" in turn or "from" not in turn else "from"
        content_key = "content" if "content" in turn or "value" not in turn else "value"
        for k in (role_key, content_key):
            if turn.get(k) is None:
                raise DataError(f"{where}: {field}.{k}: missing field")
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str) or raw_role.lower() not in ROLE_ALIASES:
            raise DataError(
                f"{where}: {field}.{role_key}: unknown role {raw_role!r} (expected one of "
                f"{', '.join(sorted(ROLE_ALIASES))})"
            )
        content = _content_text(turn.get(content_key), where, f"{field}.{content_key}")
        messages.append({"role": ROLE_ALIASES[raw_role.lower()], "content": content})
    _check_turn_order(messages, where, key)
    return messages


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.40}" if value is not None else "nothing"


def _content_text(content: Any, where: str, field: str) -> str:
    """A string, or a list of text parts ({"type": "text", "text": ...} or plain strings), as one string."""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(f"{where}: {field}[{j}]: expected a text part, got {part!r:.60}")
        content = "".join(parts)
    if not isinstance(content, str):
        raise DataError(f"{where}: {field}: expected a string or a list of text parts, got {type(content).__name__}")
    if not content.strip():
        raise DataError(f"{where}: {field}: empty content")
    return content


def _check_turn_order(messages: list[dict[str, str]], where: str, key: str) -> None:
    roles = [m["role"] for m in messages]
    for i, role in enumerate(roles):
        if role == "system" and i != 0:
            raise DataError(f"{where}: {key}[{i}].role: a system turn may only come first")
    if "assistant" not in roles:
        raise DataError(f"{where}: {key}: no assistant turn to learn from")
    if roles[-1] != "assistant":
        raise DataError(f"{where}: {key}[{len(roles) - 1}].role: the last turn must be the assistant's")
