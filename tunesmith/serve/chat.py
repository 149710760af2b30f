"""`tunesmith chat MODEL`: talk to a model in the terminal.

The conversation goes through the model's chat template; the answer streams as it is generated and ends at the
template's end-of-turn token (or at --max-new-tokens). Commands: /reset forgets the conversation (the system
prompt stays), /exit (or Ctrl-D) quits; Ctrl-C stops an answer being written.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, TextIO

from tunesmith.errors import ConfigError
from tunesmith.eval.generate import prompt_ids
from tunesmith.model.loading import best_device, context_length, load_model_and_tokenizer
from tunesmith.model.stops import stop_token_ids
from tunesmith.serve.generation import Row, Sampling, TextStream, decode

HELP = "/reset clears the conversation, /exit quits"


class ChatSession:
    """A conversation with one model: its history, and the streamed reply to each new user message."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 sampling: Sampling = Sampling()):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the model's tokenizer has no chat template, so there is no chat format to talk in; "
                              "use a tuned model (its run sets one) or `tunesmith serve` with /v1/completions")
        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_new_tokens = system, max_new_tokens
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.stop_ids = stop_token_ids(inner)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.context = context_length(inner)
        self.sampling = sampling
        self.generator = sampling.generator()  # one stream of random numbers for the whole session
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to the user's `text`; the exchange joins the history once the answer is complete."""
        self.messages.append({"role": "user", "content": text})
        answer = []
        try:
            ids = self._prompt()
            row = Row(ids, min(self.max_new_tokens, self.context - len(ids)), self.sampling,
                      generator=self.generator)
            stream = TextStream(self.tokenizer)
            for step in decode(self.model, [row], self.stop_ids, self.pad_id):
                _, token, reason = step[0]
                if reason != "stop":
                    answer.append(stream.push(token))
                    yield answer[-1]
            answer.append(stream.finish())
            yield answer[-1]
        except BaseException:
            self.messages.pop()  # an interrupted or failed turn is forgotten
            raise
        self.messages.append({"role": "assistant", "content": "".join(answer)})

    def _prompt(self) -> list[int]:
        """The prompt ids, dropping the oldest exchanges (never the system prompt) while they do not fit."""
        while True:
            ids = prompt_ids(self.tokenizer, self.messages)
            if len(ids) < self.context:
                return ids
            first = 1 if self.system else 0
            if len(self.messages) - first <= 1:
                raise ConfigError(f"the message is {len(ids)} tokens long; the model's context is {self.context}")
            del self.messages[first:first + 2]


def chat_command(model: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, base: str | None = None) -> int:
    """Load `model` (a model, run or adapter directory) and chat on stdin/stdout. Returns the exit code."""
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ConfigError("--temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens >= 1")
    loaded, tokenizer = load_model_and_tokenizer(model, base=base)
    session = ChatSession(loaded.to(best_device()), tokenizer, system, max_new_tokens,
                          Sampling(temperature, top_p, seed))
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"chatting with {model} ({HELP})", flush=True)
    return repl(session, input, sys.stdout)


def repl(session: ChatSession, read: Callable[[str], str], out: TextIO) -> int:
    """Read a line, answer it, repeat; returns 0 at /exit or end of input."""
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}: {HELP}\n")
            continue
        try:
            for delta in session.reply(line):
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        except ConfigError as exc:
            out.write(f"error: {exc}")
        out.write("\n")
        out.flush()
