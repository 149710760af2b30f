"""`tunesmith chat`: driven through a real pseudo-terminal it answers, streams, stops at end-of-turn, resets and
exits; in-process, its history and system prompt give exactly what plain transformers generates for the same
conversation, on a full model and on base + adapter."""

from __future__ import annotations

import copy
import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_export import make_adapter
from test_serve import ANSWER, hf_greedy, scripted_model_dir
from tunesmith.data.templates import install_template
from tunesmith.errors import ConfigError
from tunesmith.model.loading import load_model_and_tokenizer
from tunesmith.serve.chat import ChatSession, repl


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tokenizer):
    return scripted_model_dir(tmp_path_factory.mktemp("chat") / "tiny-chat", tokenizer)


class Terminal:
    """A child process on a pseudo-terminal: write lines, read output up to a marker."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {marker!r} in the terminal output:\n{self.seen}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    pass
        head, _, self.seen = self.seen.partition(marker)
        return head

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_chat_in_a_terminal_answers_stops_at_end_of_turn_resets_and_exits(scripted):
    term = Terminal([sys.executable, "-m", "tunesmith", "chat", str(scripted), "--max-new-tokens", "40"])
    try:
        assert "/reset" in term.read_until(">>> ")
        term.send("What is 2 plus 3?")
        answer = term.read_until(">>> ")
        # the echoed question, then the streamed answer, ended by the end-of-turn token long before 40 tokens
        assert answer.replace("\r\n", "\n").endswith("What is 2 plus 3?\n" + ANSWER + "\n"), answer
        term.send("/reset")
        assert "(conversation cleared)" in term.read_until(">>> ")
        term.send("/nonsense")
        assert "unknown command /nonsense" in term.read_until(">>> ")
        term.send("/exit")
    finally:
        code = term.close()
    assert code == 0


def _templated_llama(model_dirs, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    install_template(tokenizer, "chatml")
    return AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval(), tokenizer


def test_history_and_system_prompt_match_plain_transformers(model_dirs, tokenizer, tmp_path):
    """Each reply is what transformers generates greedily for the whole conversation so far; /reset keeps only
    the system prompt."""
    model, tok = _templated_llama(model_dirs, tokenizer)
    tok.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "tok")
    session = ChatSession(model, tok, system="Answer briefly.", max_new_tokens=6)
    system = [{"role": "system", "content": "Answer briefly."}]
    first = "".join(session.reply("What is 2 plus 3?"))
    history = system + [{"role": "user", "content": "What is 2 plus 3?"}]
    assert first == hf_greedy(tmp_path / "tok", history, max_new_tokens=6)[0] and first
    second = "".join(session.reply("And 4 plus 4?"))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And 4 plus 4?"}]
    assert second == hf_greedy(tmp_path / "tok", history, max_new_tokens=6)[0]
    assert session.messages == history + [{"role": "assistant", "content": second}]
    session.reset()
    assert session.messages == system
    fresh = "".join(session.reply("And 4 plus 4?"))
    assert fresh == hf_greedy(tmp_path / "tok", system + [{"role": "user", "content": "And 4 plus 4?"}],
                              max_new_tokens=6)[0]


def test_chat_on_base_plus_adapter(scripted, tmp_path):
    adapter = make_adapter(scripted, AutoTokenizer.from_pretrained(scripted), "lora", tmp_path / "adapter", seed=0,
                           scale=0.5)
    model, tok = load_model_and_tokenizer(str(adapter))
    reply = "".join(ChatSession(model, tok, max_new_tokens=8).reply("What is 2 plus 3?"))
    want = hf_greedy(scripted, [{"role": "user", "content": "What is 2 plus 3?"}], max_new_tokens=8,
                     adapter=adapter)[0]
    assert reply == want != ANSWER


def test_repl_reads_lines_until_end_of_input(scripted):
    model, tok = load_model_and_tokenizer(str(scripted))
    lines = iter(["", "What is 2 plus 3?", "/reset", "Hello"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    session = ChatSession(model, tok)
    assert repl(session, read, out) == 0
    assert out.getvalue() == f"{ANSWER}\n(conversation cleared)\n{ANSWER}\n\n"
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_chat_needs_a_chat_template(model_dirs, tokenizer):
    with pytest.raises(ConfigError, match="no chat template"):
        ChatSession(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), tokenizer)
