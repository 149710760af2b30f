"""The demo's evaluations: plain-text prompting of the base model, zero-shot task clusters through the chat
template, and forgetting as perplexity on unseen corpus text. Every number is a share of greedy generations
that match their reference (after `normalize_answer`), a share of preference pairs whose chosen answer is the
more probable, or a perplexity; nothing is hard-coded.

    prompts = qa_prompts(heldout, pool, shots=3, seed=0)       # "Q: ...\nA: ...\n" x3 + "Q: <query>\nA:"
    rows = score_completions(model, tokenizer, prompts)        # [{"prompt", "reference", "prediction", "correct"}]
    rows = score_preferences(model, tokenizer, pairs)          # [{..., "chosen_logp", "rejected_logp", "correct"}]
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.demo.texts import quiz_lines
from tunesmith.demo.world import QA
from tunesmith.eval.generate import complete_greedy, generate_greedy
from tunesmith.data.answers import exact_match, normalize_answer


@dataclass(frozen=True)
class Prompt:
    """One evaluation item: the text (or conversation) shown and the answers counted as correct."""

    prompt: str | list[dict[str, str]]
    references: tuple[str, ...]


def accuracy(rows: list[dict]) -> float:
    """Share of scored rows marked correct (0.0 for none)."""
    return sum(r["correct"] for r in rows) / len(rows) if rows else 0.0


# ---------------------------------------------------------------------------------------------------
# Plain-text prompting (the base model, zero-shot and few-shot)


def qa_prompts(items: list[QA], pool: list[QA], shots: int, seed: int) -> list[Prompt]:
    """Fact questions as plain text in the corpus's quiz format, after `shots` solved examples.

    Exemplars are the same question about other countries (from `pool`, the SFT countries), seeded per item,
    each answered with its reference sentence: the answer format of a task, as a benchmark's few-shot prompt
    shows it. Quiz pages answer in several wordings, so zero-shot the model must guess which one is wanted.
    """
    prompts = []
    for qa in items:
        template = qa.question.replace(qa.country, "{country}")
        candidates = [p for p in pool if p.question.replace(p.country, "{country}") == template
                      and p.country != qa.country]
        if len(candidates) < shots:
            raise ValueError(f"{shots}-shot prompts need {shots} exemplars like {qa.question!r}; the pool has "
                             f"{len(candidates)}")
        exemplars = _item_rng(seed, qa.question).sample(candidates, shots)
        text = quiz_lines([(e.question, e.answer) for e in exemplars] + [(qa.question, "")]).rstrip()
        prompts.append(Prompt(text, (qa.answer,)))
    return prompts


def _item_rng(seed: int, key: str) -> random.Random:
    # seeded by content, so an item keeps its exemplars whatever else is evaluated
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big"))


def score_completions(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 24, stop: str = "\n"
                      ) -> list[dict]:
    """Greedy continuations of plain-text prompts; the answer is the continuation up to `stop` (a base model
    does not know where to stop: it goes on with the next line of the page)."""
    continuations = complete_greedy(model, tokenizer, [p.prompt for p in prompts], max_new_tokens)
    return [_scored(p, c.strip().split(stop)[0]) for p, c in zip(prompts, continuations)]


# ---------------------------------------------------------------------------------------------------
# Chat prompts (task clusters through the templates, zero-shot)


def task_prompts(records: list[dict], task: str, seed: int) -> list[Prompt]:
    """Labelled records rendered as the pipeline renders them (`build_examples`, same seed), without the
    inverted templates, whose answers are free text: the user turn is the prompt, the assistant turn the
    reference."""
    from tunesmith.data.instruct import build_examples

    examples = build_examples(records, task, seed=seed, inverted=False, source=task)
    return [Prompt(e["messages"][:-1], (e["messages"][-1]["content"],)) for e in examples]


def completion_prompts(records: list[dict], seed: int) -> list[Prompt]:
    """Sentence-completion records as `task_prompts` renders them, with the completed sentence as a second
    reference ("The capital of Zarnia is Tonvik." beside "Tonvik.")."""
    return [Prompt(p.prompt, p.references + (f"{r['text']} {r['ending']}",))
            for p, r in zip(task_prompts(records, "completion", seed), records)]


def ends_with(prediction: str, ending: str) -> bool:
    """Whether the answer ends with `ending` as whole words, after `normalize_answer`: "Tonvik.", "The capital
    of Zarnia is Tonvik." and "Zarnia has its capital in Tonvik" all end with "Tonvik."; "Tonvikburg" does not."""
    prediction, ending = normalize_answer(prediction), normalize_answer(ending)
    return bool(ending) and (prediction == ending or prediction.endswith(" " + ending))


def score_chats(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 24, match=exact_match
                ) -> list[dict]:
    """Greedy answers through the chat template, each checked against its references with `match` (exact match;
    `ends_with` for sentence completion, whose rows also record the strict exact match)."""
    answers = generate_greedy(model, tokenizer, [p.prompt for p in prompts], max_new_tokens=max_new_tokens)
    rows = [_scored(p, a, match) for p, a in zip(prompts, answers)]
    if match is not exact_match:
        for row, p in zip(rows, prompts):
            row["exact_match"] = any(exact_match(row["prediction"], r) for r in p.references)
    return rows


def _scored(prompt: Prompt, prediction: str, match=exact_match) -> dict:
    shown = prompt.prompt if isinstance(prompt.prompt, str) else prompt.prompt[-1]["content"]
    return {"prompt": shown, "reference": prompt.references[0], "prediction": prediction,
            "correct": any(match(prediction, r) for r in prompt.references)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


# ---------------------------------------------------------------------------------------------------
# Forgetting


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Token-weighted perplexity of raw documents (each BOS? + text + EOS, loss on every token), computed
    with the training loop's own evaluation."""
    from accelerate import Accelerator

    from tunesmith.data.tokenize import Example, encode_text
    from tunesmith.objectives import build_objective
    from tunesmith.train.loop import evaluate_loss

    examples = [Example(*encode_text(tokenizer, text)) for text in texts]
    loss = evaluate_loss(model, build_objective("clm"), examples, batch_size, tokenizer.pad_token_id,
                         Accelerator(cpu=True))
    return round(math.exp(loss), 3)


# ---------------------------------------------------------------------------------------------------
# Preferences


@torch.no_grad()
def score_preferences(model, tokenizer, pairs: list[dict], batch_size: int = 16) -> list[dict]:
    """Per pair {"prompt", "chosen", "rejected", "kind"}: the log-probabilities of both answers after the prompt
    through the chat template (end-of-turn token included, tokenised as training tokenises them), and whether
    the chosen one is the more probable."""
    from tunesmith.data.batching import collate
    from tunesmith.data.formats import Row
    from tunesmith.data.tokenize import Example, encode_row
    from tunesmith.objectives.tokens import model_inputs, sequence_logps

    examples = []
    for i, pair in enumerate(pairs):
        row = Row(source=f"pair {i}", messages=({"role": "user", "content": pair["prompt"]},),
                  chosen=pair["chosen"], rejected=pair["rejected"])
        ids, labels, rejected_ids, rejected_labels = encode_row(tokenizer, row)
        examples += [Example(ids, labels), Example(rejected_ids, rejected_labels)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logps: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad)
        logps += sequence_logps(model(**model_inputs(batch)).logits, batch["labels"])[0].tolist()
    return [{"prompt": pair["prompt"], "kind": pair["kind"], "chosen": pair["chosen"], "rejected": pair["rejected"],
             "chosen_logp": round(logps[2 * i], 4), "rejected_logp": round(logps[2 * i + 1], 4),
             "correct": logps[2 * i] > logps[2 * i + 1]} for i, pair in enumerate(pairs)]
