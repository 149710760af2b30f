"""Normalise every record to one internal shape, `Row`, whatever format it came in.

    messages      OpenAI `messages` / ShareGPT `conversations` (system prompts, multi-turn, content as a
                  string or a list of text parts)                          -> Row(messages=...)
    alpaca        instruction / input / output (+ system, history)         -> Row(messages=...)
    completion    prompt / completion, no chat template                    -> Row(prompt=..., completion=...)
    text          raw text for pretraining                                 -> Row(text=...)
    classification  text / label                                           -> Row(text=..., label=...)
    preference    prompt / chosen / rejected, as text or as messages       -> Row(messages=prompt, chosen, rejected)
    unpaired      prompt / completion / label (desirable yes/no, for KTO)  -> Row(messages=prompt, completion, desirable)

Field names are mappable (`fields={"instruction": "question"}` reads the `question` column as `instruction`).
Every problem is reported as `file:line: field: problem`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.sources import iter_records, read_jsonl  # noqa: F401 (read_jsonl re-exported)
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
FORMATS = ("messages", "alpaca", "completion", "text", "classification", "preference", "unpaired")


@dataclass(frozen=True)
class Row:
    """A normalised example and where it came from (for error messages). Which fields are set says its kind."""

    source: str  # "file:line"
    messages: tuple[dict[str, str], ...] = ()  # a conversation, or the prompt turns of a preference row
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    label: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    desirable: bool | None = None
    task: str | None = None  # a labelled record's task type, or the task an instruction row was rendered from
    # (then only its last assistant turn is supervised: earlier ones are few-shot exemplars)
    record: dict[str, Any] | None = None  # the labelled record's fields, until templates turn it into chat

    @property
    def kind(self) -> str:
        if self.record is not None:
            return "task"
        if self.chosen is not None:
            return "preference"
        if self.desirable is not None:
            return "unpaired"
        if self.label is not None:
            return "classification"
        if self.prompt is not None:
            return "completion"
        return "text" if self.text is not None else "chat"


def detect_format(obj: dict[str, Any]) -> str | None:
    """The format a record's fields suggest, or None."""
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if "messages" in obj or "conversations" in obj:
        return "messages"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "unpaired" if "label" in obj else "completion"
    if "text" in obj:
        return "classification" if "label" in obj else "text"
    return None


def load_rows(
    path: str | Path,
    fmt: str = "auto",
    system_prompt: str | None = None,
    fields: dict[str, str] | None = None,
    text_unit: str = "file",
) -> list[Row]:
    """Read and normalise every record of a file, folder or glob (see `sources`).

    Args:
        fmt: "auto" (decided from the first record's fields) or one of FORMATS.
        system_prompt: prepended as a system turn to chat rows that have none.
        fields: internal field name -> the name used in the file.
    Raises:
        DataError naming file, line and field for the first bad record, or an empty source.
    """
    rows = list(iter_rows(path, fmt, system_prompt, fields, text_unit))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def iter_rows(
    path: str | Path,
    fmt: str = "auto",
    system_prompt: str | None = None,
    fields: dict[str, str] | None = None,
    text_unit: str = "file",
    on_error=None,
    task: str | None = None,
):
    """Normalised rows, streamed. `on_error(where, DataError)` decides what a bad record does: by default
    the error is raised; a handler that returns skips the record (the caller counts it). With `task`, records
    are kept as labelled records of that task type, for instruction templates to render later."""
    if fmt not in ("auto",) + FORMATS:
        raise DataError(f"{path}: unknown data format {fmt!r} (expected 'auto', {', '.join(map(repr, FORMATS))})")
    detected_at = None  # where "auto" decided the format of the file
    for where, obj in iter_records(str(path), text_unit):
        try:
            if isinstance(obj, DataError):
                raise obj
            obj = rename_fields(obj, fields, where)
            if task is not None:
                yield Row(where, task=task, record=obj)
                continue
            if fmt == "auto":
                fmt, detected_at = _detect_or_fail(obj, where), where
            own = detect_format(obj)
            if detected_at and own and own != fmt:
                raise DataError(f"{where}: this row is in {own!r} format but the file is {fmt!r} (decided by "
                                f"{detected_at}); use one format per file")
            yield _normalise(obj, fmt, where, system_prompt)
        except DataError as exc:
            if on_error is None:
                raise
            on_error(where, exc)


def rename_fields(obj: dict[str, Any], fields: dict[str, str] | None, where: str) -> dict[str, Any]:
    """Read the file's column names as the internal ones: fields = {internal: name in the file}."""
    if not fields:
        return obj
    renamed = {k: v for k, v in obj.items() if k not in fields.values()}
    for internal, external in fields.items():
        if external in obj:
            renamed[internal] = obj[external]
    return renamed


def _detect_or_fail(obj: dict[str, Any], where: str) -> str:
    fmt = detect_format(obj)
    if fmt is None:
        raise DataError(
            f"{where}: cannot tell the format from fields {sorted(obj)}; expected 'messages', "
            "'conversations', 'instruction' (alpaca), 'prompt'+'completion', 'text' (+'label'), "
            "'chosen'+'rejected', or set the source's format (and fields to map column names)"
        )
    return fmt


def _normalise(obj: dict[str, Any], fmt: str, where: str, system_prompt: str | None) -> Row:
    """One row of format `fmt` as a Row; chat rows without a system turn get `system_prompt` first."""
    if fmt == "text":
        return Row(where, text=_text_field(obj, "text", where))
    if fmt == "completion":
        return Row(where, prompt=_text_field(obj, "prompt", where), completion=_text_field(obj, "completion", where))
    if fmt == "classification":
        return Row(where, text=_text_field(obj, "text", where), label=_label(obj, where))
    if fmt in ("preference", "unpaired"):
        return _preference(obj, fmt, where, system_prompt)
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


def _label(obj: dict[str, Any], where: str) -> str:
    """A class label: a string, or an integer class id (kept as its decimal string)."""
    value = obj.get("label")
    if value is None:
        raise DataError(f"{where}: label: missing field")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label: expected a string or an integer, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: label: empty")
    return str(value)


DESIRABLE = {True: True, False: False, "true": True, "false": False, "yes": True, "no": False, 1: True, 0: False,
             "1": True, "0": False, "desirable": True, "undesirable": False}


def _preference(obj: dict[str, Any], fmt: str, where: str, system_prompt: str | None) -> Row:
    """Prompt turns plus the answers; answers may be strings or conversations ending in the assistant's turn
    (then their shared earlier turns must equal the prompt, as in TRL's conversational preference format)."""
    prompt = _prompt_turns(obj, where)
    if system_prompt and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system_prompt})
    if fmt == "unpaired":
        raw = obj.get("label")
        key = raw.lower() if isinstance(raw, str) else raw
        if isinstance(key, float) or key not in DESIRABLE:
            raise DataError(f"{where}: label: expected desirable yes/no (true/false, 1/0), got {raw!r:.40}")
        return Row(where, messages=tuple(prompt), completion=_answer(obj, "completion", where),
                   desirable=DESIRABLE[key])
    return Row(where, messages=tuple(prompt), chosen=_answer(obj, "chosen", where),
               rejected=_answer(obj, "rejected", where))


def _prompt_turns(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        turns = [_turn(t, where, f"prompt[{i}]") for i, t in enumerate(prompt)]
        if not turns or turns[-1]["role"] == "assistant":
            raise DataError(f"{where}: prompt: expected turns ending with the user's")
        return turns
    return [{"role": "user", "content": _text_field(obj, "prompt", where)}]


def _answer(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if isinstance(value, list):
        turns = [_turn(t, where, f"{key}[{i}]") for i, t in enumerate(value)]
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: {key}: expected turns ending with the assistant's")
        return turns[-1]["content"]
    return _text_field(obj, key, where)


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
    messages = [_turn(turn, where, f"{key}[{i}]") for i, turn in enumerate(turns)]
    _check_turn_order(messages, where, key)
    return messages


def _turn(turn: Any, where: str, field: str) -> dict[str, str]:
    """One OpenAI ({role, content}) or ShareGPT ({from, value}) turn."""
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
    return {"role": ROLE_ALIASES[raw_role.lower()], "content": content}


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
