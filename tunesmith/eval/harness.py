"""Run one eval set on a model: rows are read, scored and dropped batch by batch, so memory stays flat.

    loss      token-weighted next-token loss on chat, text or completion rows (the training masks and the
              training loss, `summed_nll`), perplexity = exp(loss), and top-1 accuracy on the loss tokens
    choice    multiple choice by option log-likelihood (`tunesmith.eval.loglik`): accuracy
    classify  text + label rows: accuracy and macro-F1 of a classifier's own predictions (a feature-based run,
              a classification head: `tunesmith.eval.classifiers`), or of a causal LM's choice among the
              labels by log-likelihood, so both kinds of model are scored on one scale
    generate  greedy or sampled answers scored by exact_match, rouge_l, bleu, chrf, numeric and/or a user's
              scorer; with chain of thought, by the answers read off the reasoning (`extract_answer`)

Every result holds `n`, the number of examples it is over. Only sums cross batch boundaries (and the first
few generations, as examples for the report): no logits, predictions or rows accumulate.
"""

from __future__ import annotations

import math
from itertools import islice
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from tunesmith.data.batching import collate
from tunesmith.data.formats import Row
from tunesmith.data.tokenize import Example, check_template, encode_rows, fit_example
from tunesmith.errors import DataError
from tunesmith.eval.classifiers import TextClassifier, require_lm
from tunesmith.eval.generate import generate_token_ids
from tunesmith.eval.items import item_from_row, label_item, read_items, read_labelled, read_rows, set_labels
from tunesmith.eval.loglik import best_option, continuation_logps, option_scores
from tunesmith.data.answers import extract_answer
from tunesmith.eval.metrics import LabelCounts, ScorerMeans, load_scorer, make_accumulator
from tunesmith.model.reft import positions_as_trained
from tunesmith.model.stops import stop_token_ids
from tunesmith.eval.prompting import FewShotPool, Item, Prompter
from tunesmith.eval.sets import DEFAULT_COT_INSTRUCTION, EvalSet, Settings
from tunesmith.objectives.tokens import model_inputs, shift_labels, summed_nll, target_mask

T = TypeVar("T")


def run_set(model, tokenizer, spec: EvalSet, settings: Settings = Settings()) -> dict:
    """Evaluate `model` (a causal LM, or a `TextClassifier` on classify sets) on one set.

    Returns:
        {"kind", "path", "general", "metrics": {name: value, "n": count, ...}} and, for generation sets,
        "examples": the first `settings.num_examples` predictions with their references.
    Raises:
        ConfigError for a loss, choice or generate set on a TextClassifier.
    """
    s = settings
    result: dict = {"kind": spec.kind, "path": spec.path, "general": spec.general}
    fields = dict(spec.fields)
    if spec.kind == "classify":
        result["metrics"] = classify_set_metrics(model, tokenizer, spec, s)
        return result
    require_lm(model, spec.name, spec.kind)
    if spec.kind == "loss":
        rows = read_rows(spec.path, spec.format, fields, spec.limit, s.system_prompt)
        result["metrics"] = loss_metrics(model, tokenizer, rows, s.batch_size, s.max_seq_len, s.truncation,
                                         s.train_on_prompt)
        return result
    items = read_items(spec.path, spec.kind, spec.format, fields, spec.options, spec.limit)
    prompter = Prompter(tokenizer, spec.prompt_format, _fewshot_pool(spec, s.seed),
                        spec.cot_instruction if spec.cot else None, s.system_prompt)
    if spec.kind == "choice":
        result["metrics"] = choice_metrics(model, tokenizer, items, prompter, s.batch_size, spec.length_normalize,
                                           s.max_seq_len)
        return result
    scorer = load_scorer(spec.scorer) if spec.scorer else None
    with torch.random.fork_rng():  # sampled decoding repeats run to run; the caller's random state is kept
        torch.manual_seed(s.seed)
        result["metrics"], result["examples"] = generate_metrics(
            model, tokenizer, items, prompter, spec.metrics, scorer, s.batch_size, spec.max_new_tokens,
            spec.temperature, spec.top_p, spec.cot, s.max_seq_len, s.num_examples)
    return result


def _fewshot_pool(spec: EvalSet, seed: int) -> FewShotPool | None:
    if not spec.shots:
        return None
    items = list(read_items(spec.fewshot_path, spec.kind, spec.format, dict(spec.fields), spec.options))
    if spec.cot:
        for item in items:
            if extract_answer(item.answer) is None:
                raise DataError(f"{item.source}: a chain-of-thought exemplar's answer must end in an answer "
                                f"(e.g. '... The answer is 7.'), got {item.answer!r:.60}")
    return FewShotPool(items, spec.shots, seed, source=spec.fewshot_path)


# ---------------------------------------------------------------------------------------------------
# loss


@torch.no_grad()
def loss_metrics(model, tokenizer, rows: Iterable[Row], batch_size: int = 8, max_seq_len: int = 1024,
                 truncation: str = "right", train_on_prompt: bool = False) -> dict:
    """Token-weighted loss over rows masked as training masks them (assistant turns, completions, whole texts).

    Returns:
        loss (summed NLL / loss tokens), perplexity (exp(loss)), token_accuracy (share of loss tokens that are
        the model's top-1 prediction), n (examples), tokens (loss tokens), truncated, dropped (no loss token
        left after truncation).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens, correct, n, dropped, truncated = 0.0, 0, 0, 0, 0, 0
    for chunk in batches(rows, batch_size):
        for row in chunk:
            if row.kind not in ("chat", "text", "completion"):
                raise DataError(f"{row.source}: a loss set needs chat, text or completion rows, not {row.kind}")
        check_template(tokenizer, chunk)
        examples = []
        for row, encoded in zip(chunk, encode_rows(tokenizer, chunk, train_on_prompt)):
            if isinstance(encoded, DataError):
                raise encoded
            truncated += len(encoded[0]) > max_seq_len
            fitted = fit_example(encoded[0], encoded[1], max_seq_len, truncation)
            if fitted is None:
                dropped += 1
                continue
            examples.append(Example(*fitted, row.source))
        if not examples:
            continue
        batch = {k: v.to(device) for k, v in collate(examples, _pad_id(model, tokenizer)).items()}
        with positions_as_trained(model, batch):  # ReFT: intervened where training intervened
            logits = model(**model_inputs(batch)).logits  # (B, T, V)
        loss_sum, num_tokens = summed_nll(logits, batch["labels"])
        keep = target_mask(batch["labels"])  # (B, T)
        correct += int((logits.argmax(-1)[keep] == shift_labels(batch["labels"])[keep]).sum())
        nll += float(loss_sum)
        tokens += num_tokens
        n += len(examples)
    model.train(was_training)
    loss = nll / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"),
            "token_accuracy": correct / tokens if tokens else float("nan"), "n": n, "tokens": tokens,
            "truncated": truncated, "dropped": dropped}


# ---------------------------------------------------------------------------------------------------
# choice


def choice_metrics(model, tokenizer, items: Iterable[Item], prompter: Prompter, batch_size: int = 8,
                   length_normalize: str = "none", max_seq_len: int = 1024) -> dict:
    """Accuracy of picking the correct option by (length-normalised) log-likelihood.

    Options are tokenised on their own, as completions are in training; a prompt too long for
    `max_seq_len` with its longest option loses its oldest tokens (counted in `truncated`).
    """
    correct, n, truncated = 0, 0, 0
    for chunk, chosen, cut in chosen_options(model, tokenizer, items, prompter, batch_size, length_normalize,
                                             max_seq_len):
        correct += sum(option == item.answer for option, item in zip(chosen, chunk))
        n += len(chunk)
        truncated += cut
    return {"accuracy": correct / n if n else float("nan"), "n": n, "truncated": truncated}


def chosen_options(model, tokenizer, items: Iterable[Item], prompter: Prompter, batch_size: int = 8,
                   length_normalize: str = "none", max_seq_len: int = 1024
                   ) -> Iterator[tuple[list[Item], list[str], int]]:
    """Per chunk of `batch_size` items: the items, the option each one's prompt makes most likely, and how many
    of their prompts were cut to fit `max_seq_len` (see `choice_metrics`)."""
    pad = _pad_id(model, tokenizer)
    for chunk in batches(items, batch_size):
        pairs, options, truncated = [], [], 0
        for item in chunk:
            option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in item.options]
            if not all(option_ids):
                raise DataError(f"{item.source}: options: an option tokenises to nothing")
            context, cut = fit_prompt(prompter.token_ids(item), max_seq_len - max(map(len, option_ids)))
            truncated += cut
            pairs += [(context, ids) for ids in option_ids]
            options.append(option_ids)
        logps = iter(continuation_logps(model, pairs, pad, batch_size))
        chosen = []
        for item, option_ids in zip(chunk, options):
            scores = option_scores([next(logps) for _ in option_ids], [len(ids) for ids in option_ids],
                                   [len(o) for o in item.options], length_normalize)
            chosen.append(item.options[best_option(scores)])
        yield chunk, chosen, truncated


# ---------------------------------------------------------------------------------------------------
# classify


def classify_set_metrics(model, tokenizer, spec: EvalSet, settings: Settings = Settings()) -> dict:
    """A classify set on a `TextClassifier` (its own predictions) or a causal LM (its choice among the set's
    `options`, else the labels found in the file, by log-likelihood after the text)."""
    s, fields = settings, dict(spec.fields)
    rows = read_labelled(spec.path, spec.format, fields, spec.limit)
    if isinstance(model, TextClassifier):
        return classifier_metrics(model, rows, s.batch_size)
    labels = list(spec.options) or set_labels(spec.path, spec.format, fields, spec.limit)
    prompter = Prompter(tokenizer, spec.prompt_format, _fewshot_pool(spec, s.seed), None, s.system_prompt)
    return label_choice_metrics(model, tokenizer, rows, labels, prompter, s.batch_size, spec.length_normalize,
                                s.max_seq_len)


def classifier_metrics(classifier: TextClassifier, rows: Iterable[Row], batch_size: int = 8) -> dict:
    """Accuracy and macro-F1 (`LabelCounts`) of a classifier's predicted labels on text + label rows.

    Raises:
        DataError for a row whose label is not one of the classifier's classes.
    """
    counts, known = LabelCounts(), set(classifier.labels)
    for chunk in batches(rows, batch_size):
        for row in chunk:
            if row.label not in known:
                raise DataError(f"{row.source}: label: {row.label!r} is not one of the model's classes "
                                f"{classifier.labels!r:.80}")
        counts.update(classifier.predict([row.text for row in chunk]), [row.label for row in chunk])
    return {**counts.value(), "n": counts.count}


def label_choice_metrics(model, tokenizer, rows: Iterable[Row], labels: Sequence[str], prompter: Prompter,
                         batch_size: int = 8, length_normalize: str = "none", max_seq_len: int = 1024) -> dict:
    """Accuracy and macro-F1 of a causal LM on text + label rows, its prediction being the label with the
    highest (length-normalised) log-likelihood after the text (`chosen_options` over `label_item`s)."""
    counts, truncated = LabelCounts(), 0
    items = (label_item(row, labels) for row in rows)
    for chunk, chosen, cut in chosen_options(model, tokenizer, items, prompter, batch_size, length_normalize,
                                             max_seq_len):
        counts.update(chosen, [item.answer for item in chunk])
        truncated += cut
    return {**counts.value(), "n": counts.count, "truncated": truncated}


# ---------------------------------------------------------------------------------------------------
# generate


def generate_metrics(model, tokenizer, items: Iterable[Item], prompter: Prompter,
                     metrics: Sequence[str] = ("exact_match",),
                     scorer: Callable[[str, str], float | dict[str, float]] | None = None,
                     batch_size: int = 8, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                     cot: bool = False, max_seq_len: int = 1024, num_examples: int = 3) -> tuple[dict, list[dict]]:
    """Generate an answer per item and score it.

    A chat answer ends at a stop token; a plain-text answer (a base model continuing a prompt) also ends at
    its first blank line, the separator between exemplars. With `cot` the built-in metrics compare the
    answers `extract_answer` reads off prediction and reference (`no_answer` counts predictions without
    one); a user's scorer always gets the whole prediction and reference.

    Returns:
        (metrics with `n`, `truncated` and `no_answer`, the first `num_examples` predictions).
    """
    accumulators = [make_accumulator(m) for m in metrics] + ([ScorerMeans(scorer)] if scorer else [])
    pad = _pad_id(model, tokenizer)
    room = max(1, max_seq_len - max_new_tokens)
    n, truncated, no_answer, examples = 0, 0, 0, []
    for chunk in batches(items, batch_size):
        prompts = [fit_prompt(prompter.token_ids(item), room) for item in chunk]
        truncated += sum(cut for _, cut in prompts)
        new_ids = generate_token_ids(model, [p for p, _ in prompts], pad, max_new_tokens, batch_size, temperature,
                                     top_p)
        predictions = [_answer_text(tokenizer.decode(ids, skip_special_tokens=True), prompter.is_chat(item))
                       for ids, item in zip(new_ids, chunk)]
        references = [item.answer for item in chunk]
        answers, gold = predictions, references
        if cot:
            extracted = [extract_answer(p) for p in predictions]
            no_answer += sum(a is None for a in extracted)
            answers = [a if a is not None else "" for a in extracted]
            gold = [extract_answer(r) or r for r in references]
        for acc in accumulators:
            if isinstance(acc, ScorerMeans):
                acc.update(predictions, references)
            else:
                acc.update(answers, gold)
        for item, prediction, answer in list(zip(chunk, predictions, answers))[: num_examples - len(examples)]:
            examples.append({"source": item.source, "prediction": prediction, "reference": item.answer,
                             **({"answer": answer} if cot else {})})
        n += len(chunk)
    values = {k: v for acc in accumulators for k, v in acc.value().items()}
    return {**values, "n": n, "truncated": truncated, **({"no_answer": no_answer} if cot else {})}, examples


def generation_metrics(model, tokenizer, rows: Sequence[Row], metrics: Sequence[str] = ("exact_match",),
                       max_new_tokens: int = 32, batch_size: int = 8, limit: int | None = 32, cot: bool = False,
                       prompt_format: str = "auto", system_prompt: str | None = None) -> dict:
    """Generation metrics on (a sample of) rows, e.g. the validation rows during training.

    Args:
        model: the unwrapped model (not a DDP wrapper: it generates).
        rows: chat, completion or classification rows (`tunesmith.data.formats.Row`).
        limit: the first `limit` rows only (None: all).
    Returns:
        {metric: value, "n": ..., "truncated": ...} as `generate_metrics` gives them.
    """
    items = [item_from_row(row) for row in rows[:limit]]
    prompter = Prompter(tokenizer, prompt_format, None, DEFAULT_COT_INSTRUCTION if cot else None, system_prompt)
    values, _ = generate_metrics(model, tokenizer, items, prompter, metrics, None, batch_size, max_new_tokens,
                                 cot=cot, num_examples=0)
    return values


def _answer_text(text: str, chat: bool) -> str:
    if chat:
        return text.strip()
    return text.lstrip().split("\n\n", 1)[0].rstrip()


# ---------------------------------------------------------------------------------------------------
# helpers


def batches(iterable: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last may be shorter), pulled from `iterable` one list at a time."""
    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk


def fit_prompt(ids: list[int], room: int) -> tuple[list[int], bool]:
    """The last `room` prompt tokens (the question sits at the end), and whether any were cut."""
    room = max(room, 1)
    return (ids[-room:], True) if len(ids) > room else (ids, False)


def _pad_id(model, tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(model)[0]
