"""Chat templates and loss masks (DESIGN acceptance tests 2 and 3).

Every check runs on the three built-in templates installed with `install_template` and on a tokenizer that
brings its own Jinja template (Zephyr style, ending turns with `eos_token`), over three tokenizers: the shared
one, one that adds BOS itself (Llama style) and one that lacks the chatml markers (so `install_template` has to
add them). Expected texts are written out literally: the oracle is the text, not a recomputation.

Terms: a "span" is a maximal run of consecutive supervised positions (labels != -100); the spans of a
conversation, decoded, must be exactly the assistant replies plus their end-of-turn tokens.
"""

from __future__ import annotations

import copy
import json

import pytest
from conftest import CORPUS
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from tunesmith.data.batching import collate
from tunesmith.data.formats import Row
from tunesmith.data.templates import end_of_turn_marker, install_template
from tunesmith.data.tokenize import IGNORE_INDEX, encode_chat, encode_text, tokenize_rows
from tunesmith.demo.tiny import train_tokenizer
from tunesmith.errors import DataError

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

CONVERSATION = (
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "It is 8. Indeed."},
)
SINGLE_TURN = (
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello world."},
    {"role": "assistant", "content": "Hello."},
)

# A tokenizer's own template (Zephyr style): role headers are plain text, every turn ends with eos_token.
ZEPHYR = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATES = ("chatml", "llama3", "alpaca", "gemma", "zephyr")
VARIANTS = ("default", "add_bos", "no_chatml")

# The whole conversation, rendered.
RENDERED = {
    "chatml": (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 5.<|im_end|>\n"
        "<|im_start|>user\nAnd 4 plus 4?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 8. Indeed.<|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 5.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 plus 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 8. Indeed.<|eot_id|>"
    ),
    "alpaca": (
        "<|begin_of_text|>Answer briefly.\n\n"
        "### Instruction:\nWhat is 2 plus 3?\n\n### Response:\nIt is 5.<|end_of_text|>\n\n"
        "### Instruction:\nAnd 4 plus 4?\n\n### Response:\nIt is 8. Indeed.<|end_of_text|>\n\n"
    ),
    "gemma": (  # no system role: the system message opens the first user turn
        "<start_of_turn>user\nAnswer briefly.\n\nWhat is 2 plus 3?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 5.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4 plus 4?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 8. Indeed.<end_of_turn>\n"
    ),
    "zephyr": (
        "<|begin_of_text|><|system|>\nAnswer briefly.<|end_of_text|>\n"
        "<|user|>\nWhat is 2 plus 3?<|end_of_text|>\n"
        "<|assistant|>\nIt is 5.<|end_of_text|>\n"
        "<|user|>\nAnd 4 plus 4?<|end_of_text|>\n"
        "<|assistant|>\nIt is 8. Indeed.<|end_of_text|>\n"
    ),
}
# The supervised spans of CONVERSATION, decoded: each reply plus its end-of-turn token, nothing else.
GOLDEN_SPANS = {
    "chatml": ["It is 5.<|im_end|>", "It is 8. Indeed.<|im_end|>"],
    "llama3": ["It is 5.<|eot_id|>", "It is 8. Indeed.<|eot_id|>"],
    "alpaca": ["It is 5.<|end_of_text|>", "It is 8. Indeed.<|end_of_text|>"],
    "gemma": ["It is 5.<end_of_turn>", "It is 8. Indeed.<end_of_turn>"],
    "zephyr": ["It is 5.<|end_of_text|>", "It is 8. Indeed.<|end_of_text|>"],
}
# What follows the last end-of-turn token (never supervised).
TRAILING = {"chatml": "\n", "llama3": "", "alpaca": "\n\n", "gemma": "\n", "zephyr": "\n"}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": EOS, "gemma": "<end_of_turn>", "zephyr": EOS}
# BOS exactly once where the template writes it; chatml and gemma write it when the tokenizer's own encoding adds
# one (the add_bos variant, Gemma's real tokenizer), as at inference.
BOS_COUNT = {"chatml": 0, "llama3": 1, "alpaca": 1, "gemma": 0, "zephyr": 1}
BOS_WHEN_ENCODED = ("chatml", "gemma")
ADDED = {
    ("chatml", "default"): [],
    ("chatml", "add_bos"): [],
    ("chatml", "no_chatml"): ["<|im_start|>", "<|im_end|>"],
    ("llama3", "default"): ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ("llama3", "add_bos"): ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ("llama3", "no_chatml"): ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    **{("gemma", v): ["<start_of_turn>", "<end_of_turn>"] for v in VARIANTS},
}


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def base_tokenizers(tokenizer) -> dict:
    """variant -> an untouched tokenizer (copied before any template is installed)."""
    return {
        "default": tokenizer,
        "add_bos": train_tokenizer(CORPUS, vocab_size=400, add_bos=True),
        "no_chatml": train_tokenizer(CORPUS, vocab_size=400, extra_special_tokens=()),
    }


def with_template(base, template: str):
    """A copy of `base` with `template` installed; returns (tokenizer, tokens install_template added)."""
    tok = copy.deepcopy(base)
    if template == "zephyr":
        tok.chat_template = ZEPHYR
        return tok, install_template(tok, None)
    return tok, install_template(tok, template)


def span_bounds(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of supervised positions."""
    bounds, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            bounds.append((start, i))
            start = None
    return bounds


def spans(tok, labels) -> list[str]:
    """The supervised spans, decoded from the labels themselves (special tokens kept)."""
    labels = list(labels)
    return [tok.decode(labels[s:e], skip_special_tokens=False) for s, e in span_bounds(labels)]


def chat_template_ids(tok, messages) -> list[int]:
    """Prompt ids as inference gets them. transformers 5 returns a BatchEncoding by default (return_dict=True)."""
    out = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"])


def supervised_count(labels: list[int]) -> int:
    """Loss tokens after the causal shift: position 0 is never predicted."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


# ------------------------------------------------------------------------------------- 1. round trip


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_install_template_adds_exactly_the_missing_tokens(base_tokenizers, template, variant):
    """install_template reports the template tokens it had to add; each then encodes as one token."""
    tok, added = with_template(base_tokenizers[variant], template)
    assert added == ADDED.get((template, variant), [])
    assert len(tok) == len(base_tokenizers[variant]) + len(added)
    for token in added + [END_OF_TURN[template]]:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]


def test_install_template_makes_a_split_vocabulary_entry_atomic(base_tokenizers):
    """A marker that is in the vocabulary but that the pre-tokenizer splits (a plain BPE entry) counts as missing."""
    spec = json.loads(base_tokenizers["no_chatml"].backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["<|im_start|>"], vocab["<|im_end|>"] = len(vocab), len(vocab) + 1
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=BOS,
                                  eos_token=EOS, pad_token="<|pad|>")
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # the trap
    assert install_template(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [vocab["<|im_end|>"]]
    assert spans(tok, encode_chat(tok, CONVERSATION)[1]) == GOLDEN_SPANS["chatml"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_prompt_ids_equal_apply_chat_template(base_tokenizers, template, variant):
    """The ids before each assistant reply equal apply_chat_template(prefix, add_generation_prompt=True), as text
    tokenised without special tokens and as tokenize=True; the whole conversation renders as written; BOS once."""
    tok, _ = with_template(base_tokenizers[variant], template)
    ids, labels = encode_chat(tok, CONVERSATION)
    bos = variant == "add_bos" and template in BOS_WHEN_ENCODED
    assert tok.decode(ids, skip_special_tokens=False) == (BOS if bos else "") + RENDERED[template]
    starts = [s for s, _ in span_bounds(labels)]
    assert len(starts) == 2
    for start, k in zip(starts, (2, 4)):
        prompt_text = tok.apply_chat_template(list(CONVERSATION[:k]), add_generation_prompt=True, tokenize=False)
        assert ids[:start] == tok(prompt_text, add_special_tokens=False)["input_ids"]
        assert ids[:start] == chat_template_ids(tok, CONVERSATION[:k])
    assert ids.count(tok.bos_token_id) == BOS_COUNT[template] + bos
    if BOS_COUNT[template] or bos:
        assert ids[0] == tok.bos_token_id


# ------------------------------------------------------------------------------------ 2. golden masks


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_golden_spans_are_replies_plus_end_of_turn(base_tokenizers, template, variant):
    """Decoded spans are exactly each reply plus its end-of-turn token; system, user, generation prompt and the
    whitespace after the last end-of-turn token are not supervised."""
    tok, _ = with_template(base_tokenizers[variant], template)
    ids, labels = encode_chat(tok, CONVERSATION)
    assert len(ids) == len(labels)
    assert spans(tok, labels) == GOLDEN_SPANS[template]
    for s, e in span_bounds(labels):
        assert labels[s:e] == ids[s:e]
        assert ids[e - 1] == tok.convert_tokens_to_ids(END_OF_TURN[template])
    last_end = span_bounds(labels)[-1][1]
    assert tok.decode(ids[last_end:], skip_special_tokens=False) == TRAILING[template]


def test_generation_prompt_shorter_than_the_header_supervises_the_rest():
    """With Zephyr's real generation prompt '<|assistant|>' (no newline) the model must itself write the '\\n'
    that assistant turns start with, so it is supervised; the prompt still equals apply_chat_template."""
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok.chat_template = ZEPHYR.replace("'<|assistant|>\\n'", "'<|assistant|>'")
    ids, labels = encode_chat(tok, CONVERSATION)
    assert spans(tok, labels) == ["\nIt is 5.<|end_of_text|>", "\nIt is 8. Indeed.<|end_of_text|>"]
    assert ids[: span_bounds(labels)[-1][0]] == chat_template_ids(tok, CONVERSATION[:4])


# ------------------------------------------------------------------------------- 3. pad == eos, collate


@pytest.mark.parametrize("template", TEMPLATES)
def test_end_of_turn_supervised_when_pad_is_eos(base_tokenizers, template):
    """With pad == eos, every reply's end-of-turn (EOS for alpaca/zephyr) stays supervised after collate, and
    only the padding positions are -100 beyond each example (padding ids are the EOS id)."""
    tok, _ = with_template(base_tokenizers["default"], template)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    rows = [Row("p.jsonl:1", messages=SINGLE_TURN), Row("p.jsonl:2", messages=CONVERSATION)]
    examples, report = tokenize_rows(tok, rows, max_seq_len=512)
    assert report.examples == 2 and report.truncated == 0
    batch = collate(examples, tok.pad_token_id)
    end_id = tok.convert_tokens_to_ids(END_OF_TURN[template])
    expected_spans = [["Hello." + END_OF_TURN[template]], GOLDEN_SPANS[template]]
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        labels = batch["labels"][i]
        assert labels[:n].tolist() == example.labels
        assert (labels[n:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (batch["input_ids"][i, n:] == tok.eos_token_id).all()
        assert spans(tok, labels[:n].tolist()) == expected_spans[i]
        assert labels.tolist().count(end_id) == len(expected_spans[i])  # one per reply, none from users
    assert batch["labels"].shape[1] > len(examples[0].input_ids)  # the short example really was padded


# ----------------------------------------------------------------------------------- 4. train on prompt


@pytest.mark.parametrize("template", TEMPLATES)
def test_train_on_prompt_supervises_everything(base_tokenizers, template):
    """train_on_prompt=True: labels equal input ids at every position, trailing whitespace included."""
    tok, _ = with_template(base_tokenizers["default"], template)
    ids, labels = encode_chat(tok, CONVERSATION, train_on_prompt=True)
    assert labels == ids
    assert spans(tok, labels) == [RENDERED[template]]


# ---------------------------------------------------------------------------------------- 5. truncation


@pytest.mark.parametrize("template", TEMPLATES)
def test_truncation_keeps_surviving_labels_and_reports_drops(base_tokenizers, template):
    """Cut inside the last reply ("It is 8." survives); a row whose only reply lies beyond the limit is dropped
    and reported by source; a short row is untouched; report totals are the shifted supervised counts."""
    tok, _ = with_template(base_tokenizers["default"], template)
    cut_text = tok.apply_chat_template(list(CONVERSATION[:4]), add_generation_prompt=True, tokenize=False)
    max_seq_len = len(tok(cut_text + "It is 8.", add_special_tokens=False)["input_ids"])
    long_system = ({"role": "system", "content": "Answer briefly. " * 60},) + SINGLE_TURN[1:]
    rows = [Row("t.jsonl:1", messages=CONVERSATION), Row("t.jsonl:2", messages=SINGLE_TURN),
            Row("t.jsonl:3", messages=long_system)]
    examples, report = tokenize_rows(tok, rows, max_seq_len)
    assert [e.source for e in examples] == ["t.jsonl:1", "t.jsonl:2"]
    assert spans(tok, examples[0].labels) == [GOLDEN_SPANS[template][0], "It is 8."]
    assert spans(tok, examples[1].labels) == ["Hello." + END_OF_TURN[template]]
    assert len(examples[0].input_ids) == max_seq_len
    assert (report.rows, report.examples, report.truncated) == (3, 2, 2)
    assert (report.dropped_no_loss_tokens, report.dropped_sources) == (1, ["t.jsonl:3"])
    assert report.loss_tokens == sum(supervised_count(e.labels) for e in examples)
    assert report.tokens == sum(len(e.input_ids) for e in examples)


@pytest.mark.parametrize("kept_reply_tokens, survives", [(0, False), (1, True)])
@pytest.mark.parametrize("template", TEMPLATES)
def test_truncation_at_the_prompt_boundary(base_tokenizers, template, kept_reply_tokens, survives):
    """Cutting right at the end of the prompt leaves no loss token (dropped, counted); one reply token more
    leaves exactly one loss token (kept)."""
    tok, _ = with_template(base_tokenizers["default"], template)
    prompt_len = len(chat_template_ids(tok, SINGLE_TURN[:2]))
    examples, report = tokenize_rows(tok, [Row("b.jsonl:5", messages=SINGLE_TURN)], prompt_len + kept_reply_tokens)
    assert report.truncated == 1
    assert report.examples == len(examples) == int(survives)
    assert report.dropped_no_loss_tokens == int(not survives)
    assert report.dropped_sources == ([] if survives else ["b.jsonl:5"])
    assert report.loss_tokens == kept_reply_tokens
    if survives:
        assert span_bounds(examples[0].labels) == [(prompt_len, prompt_len + 1)]


# ------------------------------------------------------------------------------------ 6. end of turn


@pytest.mark.parametrize("template", TEMPLATES)
def test_end_of_turn_marker(base_tokenizers, template):
    """The marker after an assistant reply, as each template writes it."""
    tok, _ = with_template(base_tokenizers["default"], template)
    assert end_of_turn_marker(tok) == END_OF_TURN[template]


@pytest.mark.parametrize(
    "jinja, message",
    [
        ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}", "no end-of-turn or EOS token"),
        ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}{{ eos_token }}{% endfor %}",
         "does not render the assistant's content verbatim"),
    ],
    ids=["no-marker", "content-rewritten"],
)
def test_template_without_usable_end_of_turn_is_rejected(base_tokenizers, jinja, message):
    """A template whose replies end with no marker (or that rewrites the reply) fails loudly, also in tokenize_rows
    before any row is tokenised."""
    tok = copy.deepcopy(base_tokenizers["default"])
    tok.chat_template = jinja
    with pytest.raises(DataError, match=message):
        end_of_turn_marker(tok)
    with pytest.raises(DataError, match=message):
        tokenize_rows(tok, [Row("e.jsonl:1", messages=SINGLE_TURN)], max_seq_len=512)


# ------------------------------------------------------------------------------------------ 7. text rows


@pytest.mark.parametrize(
    "variant, text, decoded",
    [
        ("default", "Hello world.", "Hello world.<|end_of_text|>"),
        ("add_bos", "Hello world.", "<|begin_of_text|>Hello world.<|end_of_text|>"),
        ("default", "Hello world.<|end_of_text|>", "Hello world.<|end_of_text|>"),
        ("add_bos", "Hello world.<|end_of_text|>", "<|begin_of_text|>Hello world.<|end_of_text|>"),
    ],
)
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_text_rows_are_bos_text_eos_all_supervised(base_tokenizers, variant, text, decoded, pad_is_eos):
    """A text row is BOS (if the tokenizer adds one) + text + one EOS, every token supervised, pad == eos or not."""
    tok = copy.deepcopy(base_tokenizers[variant])
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    ids, labels = encode_text(tok, text)
    assert tok.decode(ids, skip_special_tokens=False) == decoded
    assert labels == ids
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert ids.count(tok.bos_token_id) == (1 if variant == "add_bos" else 0)
    examples, report = tokenize_rows(tok, [Row("x.jsonl:1", text=text)], max_seq_len=512)
    assert report.loss_tokens == len(ids) - 1  # everything but position 0, EOS included


# ------------------------------------------------------------------------------ 8. unusable templates

# Earlier assistant turns gain " (earlier)" once more turns follow: each prefix renders differently.
NOT_PREFIX_STABLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and not loop.last %} (earlier){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The generation prompt ends in a space that merges with the reply's first word (" It" is one pre-token).
SPLIT_BOUNDARY = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_not_prefix_stable_template_is_rejected(base_tokenizers):
    """Such a template still masks a single reply correctly, but a multi-turn row raises, naming the problem, the
    turn and (in tokenize_rows) the row's source."""
    tok = copy.deepcopy(base_tokenizers["default"])
    tok.chat_template = NOT_PREFIX_STABLE
    assert spans(tok, encode_chat(tok, SINGLE_TURN)[1]) == ["Hello.<|im_end|>"]
    with pytest.raises(DataError, match=r"^messages\[2\]: the chat template is not prefix-stable"):
        encode_chat(tok, CONVERSATION)
    rows = [Row("s.jsonl:1", messages=SINGLE_TURN), Row("s.jsonl:7", messages=CONVERSATION)]
    with pytest.raises(DataError, match=r"^s\.jsonl:7: messages\[2\]: the chat template is not prefix-stable"):
        tokenize_rows(tok, rows, max_seq_len=512)


def test_prompt_ending_inside_a_token_is_rejected(base_tokenizers):
    """A prompt whose last token merges with the reply's first cannot be reproduced at inference: error with source.
    Whether it merges depends on the vocabulary, so the same template is fine for a reply whose first token stays
    apart from the space."""
    tok = copy.deepcopy(base_tokenizers["default"])
    tok.chat_template = SPLIT_BOUNDARY
    assert spans(tok, encode_chat(tok, SINGLE_TURN)[1]) == ["Hello.<|end_of_text|>"]  # ": " + "Hel": no merge
    with pytest.raises(DataError, match=r"^q\.jsonl:3: messages\[2\]: a turn boundary falls inside a token"):
        tokenize_rows(tok, [Row("q.jsonl:3", messages=CONVERSATION[:3])], max_seq_len=512)  # " It" is one token


def test_template_exception_names_the_row(base_tokenizers):
    """A template's raise_exception (here: no system role) becomes a DataError prefixed with the row's source."""
    tok = copy.deepcopy(base_tokenizers["default"])
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match=r"^r\.jsonl:2: the chat template cannot render .*system role not supported"):
        tokenize_rows(tok, [Row("r.jsonl:2", messages=SINGLE_TURN)], max_seq_len=512)


@pytest.mark.parametrize("template", TEMPLATES)
def test_conversation_starting_with_the_assistant_is_rejected(base_tokenizers, template):
    """A reply with nothing before it has no prompt to render (transformers refuses an empty conversation): a
    DataError naming the row and turn, not a bare ValueError."""
    tok, _ = with_template(base_tokenizers["default"], template)
    rows = [Row("g.jsonl:4", messages=({"role": "assistant", "content": "Hi."}, *SINGLE_TURN[1:]))]
    with pytest.raises(DataError, match=r"^g\.jsonl:4: messages\[0\]: the conversation starts with an assistant"):
        tokenize_rows(tok, rows, max_seq_len=512)
