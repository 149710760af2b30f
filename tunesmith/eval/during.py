"""Generation metrics on a small sample of tokenised validation examples, run by the training loop.

Each example's prompt is its tokens before the first supervised one (exactly what training conditioned on),
its reference the supervised tokens decoded; the model answers greedily and stops at its stop tokens.
Metrics are streamed (tunesmith.eval.metrics accumulators), so memory does not grow with the sample.
"""

from __future__ import annotations

from typing import Sequence

from tunesmith.data.tokenize import IGNORE_INDEX, Example
from tunesmith.eval.generate import generate_token_ids
from tunesmith.eval.metrics import make_accumulator


def sample_generation_metrics(model, tokenizer, examples: Sequence[Example], metrics: Sequence[str],
                              max_new_tokens: int = 64, batch_size: int = 8) -> dict[str, float]:
    """Greedy answers to the examples' prompts scored against their supervised answers."""
    accumulators = [make_accumulator(name) for name in metrics]
    model = getattr(model, "module", model)
    for start in range(0, len(examples), batch_size):
        prompts, references = [], []
        for e in examples[start : start + batch_size]:
            first = next((i for i, t in enumerate(e.labels) if t != IGNORE_INDEX), len(e.labels))
            prompts.append(e.input_ids[:first])
            references.append([t for t in e.labels[first:] if t != IGNORE_INDEX])
        answers = generate_token_ids(model, prompts, tokenizer.pad_token_id, max_new_tokens, batch_size)
        predictions = tokenizer.batch_decode(answers, skip_special_tokens=True)
        truths = tokenizer.batch_decode(references, skip_special_tokens=True)
        for accumulator in accumulators:
            accumulator.update([p.strip() for p in predictions], [t.strip() for t in truths])
    out: dict[str, float] = {}
    for accumulator in accumulators:
        out.update(accumulator.value())
    return out
