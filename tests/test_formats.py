"""JSONL reading and format normalisation (tunesmith.data.formats).

Every format becomes `messages` (role/content dicts) or `text`; every bad row is reported as
`path:line: field: problem` (acceptance test 7: malformed data names file, line and field).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data.formats import Row, detect_format, load_rows, read_jsonl
from tunesmith.errors import DataError

USER_ASSISTANT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def write_lines(path: Path, lines: list) -> Path:
    """Each item is a JSON-serialisable object, or a str/bytes written verbatim as one line."""
    data = b""
    for line in lines:
        if isinstance(line, bytes):
            data += line + b"\n"
        elif isinstance(line, str):
            data += line.encode() + b"\n"
        else:
            data += json.dumps(line).encode() + b"\n"
    path.write_bytes(data)
    return path


def roles_and_contents(row: Row) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in row.messages]


# ------------------------------------------------------------------------------------------------
# Formats


def test_openai_messages_are_kept_as_is(tmp_path):
    """OpenAI `messages` rows keep roles, contents and order; the source is `path:line`."""
    path = write_lines(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}] + USER_ASSISTANT},
        {"messages": USER_ASSISTANT + [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}]},
    ])
    rows = load_rows(path)
    assert roles_and_contents(rows[0]) == [("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello.")]
    assert [r for r, _ in roles_and_contents(rows[1])] == ["user", "assistant", "user", "assistant"]
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:2"]
    assert all(r.text is None for r in rows)


def test_sharegpt_conversations_with_human_gpt_roles(tmp_path):
    """ShareGPT `conversations` with from/value and system/human/gpt roles become system/user/assistant."""
    path = write_lines(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Sys."},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "Human", "value": "Q2"},
        {"from": "GPT", "value": "A2"},
    ]}])
    (row,) = load_rows(path)
    assert roles_and_contents(row) == [
        ("system", "Sys."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"),
    ]


def test_alpaca_without_input(tmp_path):
    """Alpaca without `input`: the instruction alone is the user turn, the output the assistant turn."""
    path = write_lines(tmp_path / "a.jsonl", [{"instruction": "Name a colour.", "output": "Red."}])
    (row,) = load_rows(path)
    assert roles_and_contents(row) == [("user", "Name a colour."), ("assistant", "Red.")]


def test_alpaca_with_input_joins_with_blank_line(tmp_path):
    """Alpaca `input` is appended to the instruction after a blank line; an empty input is ignored."""
    path = write_lines(tmp_path / "a.jsonl", [
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Count.", "input": "  ", "output": "3"},
    ])
    first, second = load_rows(path)
    assert roles_and_contents(first) == [("user", "Translate.\n\nbonjour"), ("assistant", "hello")]
    assert roles_and_contents(second) == [("user", "Count."), ("assistant", "3")]


def test_alpaca_with_system(tmp_path):
    """An alpaca `system` field becomes the first (system) turn."""
    path = write_lines(tmp_path / "a.jsonl", [{"system": "Be terse.", "instruction": "Hi", "output": "Yo"}])
    (row,) = load_rows(path)
    assert roles_and_contents(row) == [("system", "Be terse."), ("user", "Hi"), ("assistant", "Yo")]


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    """LLaMA-Factory's alpaca `history` pairs come before the current turn (after the system turn)."""
    path = write_lines(tmp_path / "a.jsonl", [
        {"system": "S", "instruction": "Q2", "output": "A2", "history": [["Q1", "A1"]]},
    ])
    (row,) = load_rows(path)
    assert roles_and_contents(row) == [
        ("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"),
    ]


def test_text_rows(tmp_path):
    """`text` rows keep the text verbatim (whitespace included) and have no messages."""
    path = write_lines(tmp_path / "t.jsonl", [{"text": "Paris is in France.\n"}, {"text": " Lima "}])
    rows = load_rows(path)
    assert [r.text for r in rows] == ["Paris is in France.\n", " Lima "]
    assert all(r.messages == () for r in rows)


def test_detect_format():
    """The detected format of a row follows its distinguishing field."""
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "messages"
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"prompt": "x"}) is None


def test_explicit_format_overrides_detection(tmp_path):
    """A row with both `text` and alpaca fields is alpaca when detected, text when fmt='text'."""
    path = write_lines(tmp_path / "t.jsonl", [{"text": "raw", "instruction": "Q", "output": "A"}])
    assert load_rows(path, fmt="text")[0].text == "raw"
    assert roles_and_contents(load_rows(path)[0]) == [("user", "Q"), ("assistant", "A")]


def test_text_parts_are_joined(tmp_path):
    """Content given as a list of text parts (dicts or plain strings) becomes one string."""
    path = write_lines(tmp_path / "p.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": ["Hi ", {"text": "there"}]},
    ]}])
    (row,) = load_rows(path)
    assert roles_and_contents(row) == [("user", "Hello, world"), ("assistant", "Hi there")]


def test_mixed_string_and_list_content_in_one_file(tmp_path):
    """Rows with string content and rows with list content normalise to the same shape."""
    as_string = {"messages": USER_ASSISTANT}
    as_parts = {"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                             for m in USER_ASSISTANT]}
    rows = load_rows(write_lines(tmp_path / "mixed.jsonl", [as_string, as_parts]))
    assert rows[0].messages == rows[1].messages
    assert all(isinstance(m["content"], str) for r in rows for m in r.messages)


def test_system_prompt_inserted_only_where_missing(tmp_path):
    """`system_prompt` is prepended to chat rows without a system turn; an existing one is kept."""
    path = write_lines(tmp_path / "m.jsonl", [
        {"messages": USER_ASSISTANT}, {"messages": [{"role": "system", "content": "Own."}] + USER_ASSISTANT},
    ])
    rows = load_rows(path, system_prompt="Default.")
    assert roles_and_contents(rows[0]) == [("system", "Default."), ("user", "Hi?"), ("assistant", "Hello.")]
    assert [m["content"] for m in rows[1].messages] == ["Own.", "Hi?", "Hello."]


def test_system_prompt_for_alpaca_and_not_text(tmp_path):
    """`system_prompt` also applies to alpaca rows; text rows are untouched."""
    alpaca = write_lines(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "A"}])
    text = write_lines(tmp_path / "t.jsonl", [{"text": "plain"}])
    assert load_rows(alpaca, system_prompt="Sys.")[0].messages[0] == {"role": "system", "content": "Sys."}
    assert load_rows(text, system_prompt="Sys.")[0] == Row(f"{text}:1", text="plain")


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    """Blank and whitespace-only lines are skipped; sources still give the physical line number."""
    path = write_lines(tmp_path / "b.jsonl", ["", {"text": "a"}, "   ", "\t", {"text": "b"}])
    assert [r.source for r in load_rows(path)] == [f"{path}:2", f"{path}:5"]


def test_crlf_and_byte_order_mark(tmp_path):
    """Windows line endings and a UTF-8 byte order mark at the start of the file are accepted."""
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [r.text for r in load_rows(path)] == ["a", "b"]


def test_read_jsonl_yields_line_numbers(tmp_path):
    """read_jsonl yields (physical line number, object) and skips blank lines."""
    path = write_lines(tmp_path / "r.jsonl", [{"a": 1}, "", {"b": 2}])
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"b": 2})]


# ------------------------------------------------------------------------------------------------
# Malformed files: each message starts with `path:line: field`


def message_for(path: Path, lines: list, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as info:
        load_rows(write_lines(path, lines), fmt=fmt)
    return str(info.value)


GOOD = {"messages": USER_ASSISTANT}

MALFORMED = {
    # case: (lines, fmt, expected message prefix after "path:")
    "invalid_json": ([GOOD, '{"messages": [}'], "auto", "2: invalid JSON"),
    "non_utf8": ([GOOD, GOOD, b'{"text": "caf\xe9"}'], "auto", "3: invalid UTF-8"),
    "json_array": ([["not", "an", "object"]], "auto", "1: expected a JSON object, got list"),
    "json_string": ([GOOD, '"just a string"'], "auto", "2: expected a JSON object, got str"),
    "unknown_format": ([{"question": "x", "answer": "y"}], "auto", "1: cannot tell the format"),
    "missing_messages": ([GOOD, {"text": "x"}], "messages", "2: messages: missing field"),
    "messages_not_list": ([{"messages": "hi"}], "auto", "1: messages: expected a non-empty list"),
    "messages_empty": ([{"messages": []}], "auto", "1: messages: expected a non-empty list"),
    "turn_not_object": ([{"messages": ["hi", USER_ASSISTANT[1]]}], "auto", "1: messages[0]: expected an object"),
    "missing_role": ([{"messages": [{"content": "x"}, USER_ASSISTANT[1]]}], "auto", "1: messages[0].role: missing"),
    "missing_content": ([{"messages": [{"role": "user"}, USER_ASSISTANT[1]]}], "auto",
                        "1: messages[0].content: missing field"),
    "unknown_role": ([{"messages": [{"role": "critic", "content": "x"}, USER_ASSISTANT[1]]}], "auto",
                     "1: messages[0].role: unknown role 'critic'"),
    "unknown_sharegpt_role": ([{"conversations": [{"from": "human", "value": "q"},
                                                  {"from": "observer", "value": "a"}]}], "auto",
                              "1: conversations[1].from: unknown role 'observer'"),
    "wrong_type_content": ([{"messages": [USER_ASSISTANT[0], {"role": "assistant", "content": 7}]}], "auto",
                           "1: messages[1].content: expected a string or a list of text parts, got int"),
    "image_part": ([{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                                  USER_ASSISTANT[1]]}], "auto", "1: messages[0].content[0]: expected a text part"),
    "empty_content": ([GOOD, {"messages": [USER_ASSISTANT[0], {"role": "assistant", "content": "  "}]}], "auto",
                      "2: messages[1].content: empty content"),
    "empty_parts": ([{"messages": [USER_ASSISTANT[0], {"role": "assistant", "content": []}]}], "auto",
                    "1: messages[1].content: empty content"),
    "last_not_assistant": ([{"messages": USER_ASSISTANT + [{"role": "user", "content": "More?"}]}], "auto",
                           "1: messages[2].role: the last turn must be the assistant's"),
    "no_assistant": ([{"messages": [USER_ASSISTANT[0]]}], "auto", "1: messages: no assistant turn"),
    "late_system": ([{"messages": USER_ASSISTANT + [{"role": "system", "content": "x"}, USER_ASSISTANT[1]]}],
                    "auto", "1: messages[2].role: a system turn may only come first"),
    "alpaca_missing_output": ([{"instruction": "Q"}], "auto", "1: output: missing field"),
    "alpaca_wrong_type": ([{"instruction": ["Q"], "output": "A"}], "auto",
                          "1: instruction: expected a string, got list"),
    "alpaca_empty_output": ([{"instruction": "Q", "output": ""}], "auto", "1: output: empty"),
    "alpaca_bad_input": ([{"instruction": "Q", "input": 3, "output": "A"}], "auto",
                         "1: input: expected a string, got int"),
    "alpaca_bad_history": ([{"instruction": "Q", "output": "A", "history": [["only one"]]}], "auto",
                           "1: history[0]: expected an [instruction, response] pair"),
    "text_wrong_type": ([{"text": 5}], "auto", "1: text: expected a string, got int"),
    "text_empty": ([{"text": "a"}, {"text": ""}], "auto", "2: text: empty"),
    "text_null": ([{"text": None}], "text", "1: text: missing field"),
    "mixed_formats": ([GOOD, "", {"text": "x"}], "auto", "3: this row is in 'text' format but the file is "
                                                         "'messages'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_row_names_file_line_and_field(tmp_path, case):
    """The first bad row is reported as `path:line: field: problem`, with the physical line number."""
    lines, fmt, expected = MALFORMED[case]
    path = tmp_path / f"{case}.jsonl"
    assert message_for(path, lines, fmt).startswith(f"{path}:{expected}")


def test_line_number_counts_blank_lines(tmp_path):
    """A bad row after blank lines is reported at its physical line."""
    path = tmp_path / "gap.jsonl"
    assert message_for(path, [GOOD, "", "", {"messages": [USER_ASSISTANT[0]]}]).startswith(f"{path}:4: messages:")


def test_invalid_json_names_the_column(tmp_path):
    """Invalid JSON says where in the line it broke."""
    path = tmp_path / "bad.jsonl"
    assert "(column 9)" in message_for(path, ['{"text":}'])


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    """A file with no rows (empty, or blank lines only) is an error naming the file."""
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="no examples") as info:
        load_rows(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file(tmp_path):
    """A missing file is a DataError naming the path, not an OSError traceback."""
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == f"{path}: data file not found"


def test_unknown_format_name(tmp_path):
    """An unknown `fmt` argument is refused instead of being read as chat data."""
    path = write_lines(tmp_path / "m.jsonl", [GOOD])
    with pytest.raises(DataError, match="unknown data format 'sharegpt'"):
        load_rows(path, fmt="sharegpt")
