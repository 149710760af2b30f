"""LoReFT: the formula, the positions it edits (training, prompts, decoding), save/load, and that it learns."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from tunesmith.data.tokenize import IGNORE_INDEX, Example, encode_completion, encode_text
from tunesmith.demo.tiny import build_model, train_tokenizer
from tunesmith.errors import ConfigError, DataError
from tunesmith.model.reft import (CONFIG_FILE, WEIGHTS_FILE, LoReFT, ReftSpec, apply_reft, intervening_on_prompts,
                                  load_reft, prompt_mask_from_labels, prompt_positions, resolve_layers)
from tunesmith.model.strategies import apply_strategy, parameter_counts
from tunesmith.objectives import build_objective
from tunesmith.train.loop import train_step
from tunesmith.train.optim import build_optimizer, build_scheduler

HIDDEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(family: str = "llama", vocab: int = 120, seed: int = 0):
    return build_model(family, vocab_size=vocab, seed=seed).eval()


def _randomize(reft) -> None:
    """Move the interventions away from their initial values, so a test cannot pass by accident."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def test_loreft_is_h_plus_rt_of_wh_plus_b_minus_rh():
    """Phi(h) = h + R^T (W h + b - R h), written out with the module's own R, W, b."""
    torch.manual_seed(0)
    layer = LoReFT(HIDDEN, rank=3)
    with torch.no_grad():
        layer.source.bias.normal_()
    h = torch.randn(5, 7, HIDDEN)
    r, w, b = layer.rotate.weight.detach(), layer.source.weight.detach(), layer.source.bias.detach()
    expected = h + (h @ w.T + b - h @ r.T) @ r
    torch.testing.assert_close(layer(h), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r @ r.T, torch.eye(3), atol=1e-6, rtol=0)
    # Inside the subspace the result is W h + b; outside it h is untouched.
    torch.testing.assert_close(layer(h) @ r.T, h @ w.T + b, atol=1e-5, rtol=1e-5)
    outside = torch.eye(HIDDEN) - r.T @ r
    torch.testing.assert_close(layer(h) @ outside, h @ outside, atol=1e-5, rtol=1e-5)


def test_rotation_stays_orthonormal_while_training_and_counts_2rd_plus_r():
    torch.manual_seed(0)
    layer = LoReFT(HIDDEN, rank=4)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 4 * HIDDEN + 4
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    h, target = torch.randn(32, HIDDEN), torch.randn(32, HIDDEN)
    first = layer.rotate.weight.detach().clone()
    for _ in range(20):
        optimizer.zero_grad()
        ((layer(h) - target) ** 2).mean().backward()
        optimizer.step()
    r = layer.rotate.weight.detach()
    assert (r - first).abs().max() > 1e-2, "R trained"
    torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-5, rtol=0)


def test_prompt_positions_first_and_last_real_tokens_with_either_padding():
    right = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0],
                          [1, 1, 1, 0, 0, 0, 0, 0]])
    left = right.flip(-1)
    want_right = torch.tensor([[1, 0, 0, 0, 1, 1, 0, 0],
                               [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)  # short row: the spans overlap
    assert torch.equal(prompt_positions(right, first=1, last=2), want_right)
    want_left = torch.tensor([[0, 0, 1, 0, 0, 0, 1, 1],
                              [0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(prompt_positions(left, first=1, last=2), want_left)
    assert torch.equal(prompt_positions(right, first=0, last=1)[0], torch.tensor([0, 0, 0, 0, 0, 1, 0, 0]).bool())


def test_prompt_is_what_comes_before_the_first_label():
    labels = torch.tensor([[IGNORE_INDEX] * 3 + [5, 6, IGNORE_INDEX],
                           [IGNORE_INDEX] * 2 + [7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    want = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(prompt_mask_from_labels(labels, mask), want)
    with pytest.raises(DataError, match="supervised from its first token"):
        prompt_mask_from_labels(torch.tensor([[4, 5, IGNORE_INDEX]]))


def test_layers_resolve_and_refuse_what_does_not_exist():
    assert resolve_layers("all", 3) == (0, 1, 2)
    assert resolve_layers([-1, 0, 2], 3) == (0, 2)
    with pytest.raises(ConfigError, match="block 3 does not exist"):
        resolve_layers([3], 3)
    with pytest.raises(ConfigError, match="rank"):
        LoReFT(HIDDEN, rank=HIDDEN + 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_reft_edits_exactly_the_chosen_positions_of_the_chosen_block(family):
    """hidden_states[1] (block 0's output) of the ReFT model = the base model's, with Phi applied by hand at
    the first and last prompt positions only; hidden_states[0] (embeddings) is untouched."""
    base = _tiny(family)
    reft = apply_reft(_tiny(family), ReftSpec(layers=[0], rank=4, first=1, last=2))
    _randomize(reft)
    ids = torch.randint(5, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a shorter, right-padded row
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = reft(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    chosen = prompt_positions(mask, 1, 2)
    layer = reft.interventions["0"]
    r, w, b = layer.rotate.weight.detach(), layer.source.weight.detach(), layer.source.bias.detach()
    h = want[1]
    expected = torch.where(chosen[..., None], h + (h @ w.T + b - h @ r.T) @ r, h)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1][~chosen], want[1][~chosen]), "other positions bitwise unchanged"


def _completion_examples(tokenizer, pairs):
    return [Example(*encode_completion(tokenizer, prompt, answer)) for prompt, answer in pairs]


def _train(model, objective, examples, pad_id, steps, lr, batch_size=8, seed=0):
    optimizer = build_optimizer(model, lr, 0.0, (0.9, 0.999), 1e-8)
    scheduler = build_scheduler(optimizer, steps, 0, "constant")
    accelerator, order = Accelerator(cpu=True), torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picked = torch.randperm(len(examples), generator=order)[:batch_size].tolist()
        batch = objective.collate([examples[i] for i in picked], pad_id)
        train_step(model, objective, optimizer, scheduler, accelerator, [batch], 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def qa_tokenizer():
    return train_tokenizer([f"Question: What is {a} plus {b}? Answer: {a + b}" for a in range(10) for b in range(10)],
                           vocab_size=200)


def test_reft_trains_only_its_interventions_and_the_base_stays_bitwise(qa_tokenizer):
    base_state = {k: v.clone() for k, v in _tiny(vocab=len(qa_tokenizer)).state_dict().items()}
    reft = apply_strategy(_tiny(vocab=len(qa_tokenizer)), "reft", reft=ReftSpec(layers="all", rank=4, first=2, last=2))
    names = [n for n, p in reft.named_parameters() if p.requires_grad]
    per_layer = ["rotate.parametrizations.weight.original", "source.weight", "source.bias"]
    assert names == [f"interventions.{i}.{n}" for i in (0, 1) for n in per_layer]
    assert parameter_counts(reft)[0] == 2 * (2 * 4 * HIDDEN + 4)
    before = {n: p.detach().clone() for n, p in reft.named_parameters() if p.requires_grad}
    examples = _completion_examples(qa_tokenizer, [(f"Question: What is {a} plus 2?", f" Answer: {a + 2}")
                                                   for a in range(8)])
    objective = intervening_on_prompts(build_objective("sft"))
    _train(reft, objective, examples, qa_tokenizer.pad_token_id, steps=3, lr=1e-2)
    assert all(not torch.equal(before[n], p) for n, p in reft.named_parameters() if p.requires_grad)
    after = reft.model.state_dict()
    assert after.keys() == base_state.keys()
    assert all(torch.equal(after[k], base_state[k]) for k in base_state), "base weights bitwise unchanged"


def test_training_intervenes_on_the_prompt_the_labels_give(qa_tokenizer):
    """Inside the objective, the ReFT model sees the positions of the prompt (before the first label), not the
    whole row: the loss equals one computed with those positions set by hand."""
    reft = apply_reft(_tiny(vocab=len(qa_tokenizer)), ReftSpec(layers="all", rank=4, first=1, last=1))
    _randomize(reft)
    objective = build_objective("sft")
    examples = _completion_examples(qa_tokenizer, [("Question: What is 3 plus 4?", " Answer: 7"),
                                                   ("Question: 1 plus 1?", " Answer: 2")])
    batch = objective.collate(examples, qa_tokenizer.pad_token_id)
    with torch.no_grad():
        got = intervening_on_prompts(objective).loss(reft, batch).loss_sum
        prompt = prompt_mask_from_labels(batch["labels"], batch["attention_mask"])
        with reft.positions(prompt_positions(prompt, 1, 1)):
            by_hand = objective.loss(reft, batch).loss_sum
        whole_row = objective.loss(reft, batch).loss_sum  # default rule: every real token is prompt
    assert got.item() == by_hand.item()
    assert abs(got.item() - whole_row.item()) > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_matches_a_full_forward_with_interventions_on_the_prompt_only(family):
    """Greedy decoding with the KV cache (prompt intervened at prefill, generated tokens never) gives the same
    tokens and logits as one forward pass over prompt + continuation with the prompt positions intervened."""
    reft = apply_reft(_tiny(family), ReftSpec(layers="all", rank=4, first=2, last=2))
    _randomize(reft)
    torch.manual_seed(3)
    prompt = torch.randint(5, 120, (1, 7))
    out = reft.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                        eos_token_id=None)
    sequence = out.sequences  # (1, 13)
    step_logits = torch.stack(out.logits, dim=1)  # (1, 6, V): each step's next-token logits
    on_prompt = torch.zeros_like(sequence, dtype=torch.bool)
    on_prompt[:, :7] = prompt_positions(torch.ones_like(prompt), 2, 2)
    with torch.no_grad(), reft.positions(on_prompt):
        full = reft(input_ids=sequence).logits  # (1, 13, V)
        everywhere = prompt_positions(torch.ones_like(sequence), 2, 2)  # would also edit generated tokens
    torch.testing.assert_close(step_logits, full[:, 6:12], atol=1e-5, rtol=1e-5)
    assert torch.equal(sequence[:, 7:], full[:, 6:12].argmax(-1))
    with torch.no_grad(), reft.positions(everywhere):
        wrong = reft(input_ids=sequence).logits
    assert (wrong[:, 6:12] - step_logits).abs().max() > 1e-3, "intervening on generated tokens would differ"
    with torch.no_grad(), reft.disable_adapter():
        plain = reft(input_ids=sequence).logits
    assert (plain[:, 6:12] - step_logits).abs().max() > 1e-3, "the interventions act"


def test_batched_generation_with_left_padding_matches_single_prompts():
    reft = apply_reft(_tiny(), ReftSpec(layers="all", rank=4, first=1, last=2))
    _randomize(reft)
    torch.manual_seed(4)
    prompts = [torch.randint(5, 120, (n,)) for n in (8, 5)]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 8 - len(p):], mask[i, 8 - len(p):] = p, 1
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = reft.generate(input_ids=ids, attention_mask=mask, **settings)[:, 8:]
    for i, p in enumerate(prompts):
        single = reft.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               **settings)[:, len(p):]
        assert torch.equal(batched[i], single[0])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_saved_interventions_reload_onto_a_fresh_base_to_the_same_logits(tmp_path, family):
    reft = apply_reft(_tiny(family), ReftSpec(layers=[-1], rank=2, first=1, last=3, dropout=0.1))
    _randomize(reft)
    reft.eval().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    reloaded = load_reft(_tiny(family), tmp_path)
    ids = torch.randint(5, 120, (2, 8))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - reft(input_ids=ids).logits).abs().max().item() < 1e-6
        assert (reloaded(input_ids=ids).logits - _tiny(family)(input_ids=ids).logits).abs().max().item() > 1e-4
    assert reloaded.spec == reft.spec


def test_a_classification_head_trains_with_the_interventions_and_is_saved_with_them(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir = tmp_path / "base"
    _tiny().save_pretrained(base_dir)

    def classifier():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3, pad_token_id=0)

    reft = apply_strategy(classifier(), "reft", task_type="SEQ_CLS", reft=ReftSpec(layers=[0], rank=2))
    names = [n for n, p in reft.named_parameters() if p.requires_grad]
    assert names[0] == "model.score.weight" and all(n.startswith("interventions.0.") for n in names[1:])
    assert len(names) == 4
    with torch.no_grad():
        reft.model.score.weight.normal_()
    _randomize(reft)
    reft.save_pretrained(tmp_path / "reft")
    reloaded = load_reft(classifier(), tmp_path / "reft")
    ids = torch.randint(5, 120, (2, 6))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - reft.eval()(input_ids=ids).logits).abs().max().item() < 1e-6


def test_load_refuses_a_base_of_another_width(tmp_path):
    reft = apply_reft(_tiny(), ReftSpec(layers=[0], rank=2))
    reft.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="hidden size 64"):
        load_reft(build_model("llama", vocab_size=120, hidden_size=32), tmp_path)


# ---------------------------------------------------------------------------------------------------
# It learns: an instruction task on a tiny pretrained model, with >= 10x fewer parameters than LoRA r=8

COUNTRIES = ["Brenia", "Dorland", "Gorvia", "Kestal", "Lumora", "Nadir", "Pelosa", "Tarvik"]
CAPITALS = ["Ashford", "Belmar", "Corvik", "Delton", "Eskar", "Fenmoor", "Gralis", "Halvard"]
FACTS = ["The capital of {c} is {a}.", "{a} is the capital of {c}.", "In {c}, the capital city is {a}."]
QUESTIONS = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"]


def _fact_tokenizer():
    facts = [f.format(c=c, a=a) for f in FACTS for c, a in zip(COUNTRIES, CAPITALS)]
    return train_tokenizer(facts * 4 + [q.format(c="") for q in QUESTIONS] * 4 + ["Question: Answer:"] * 4,
                           vocab_size=400)


def _pretrained_on_facts(tokenizer):
    """A tiny Llama that read each fact in three phrasings (full training, plain text), never a question: a
    random model has no representations worth intervening on."""
    model = build_model("llama", vocab_size=len(tokenizer), seed=0)
    corpus = [Example(*encode_text(tokenizer, f.format(c=c, a=a))) for f in FACTS for c, a in zip(COUNTRIES, CAPITALS)]
    return _train(model, build_objective("clm"), corpus, tokenizer.pad_token_id, steps=150, lr=3e-3, batch_size=12)


def _answers_greedily(model, tokenizer, pairs) -> float:
    """Share of prompts whose greedy continuation is exactly the answer and then EOS."""
    right = 0
    for prompt, answer in pairs:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        want = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(want),
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        right += out[0, ids.shape[1]:].tolist() == want
    return right / len(pairs)


def test_reft_learns_an_instruction_task_with_10x_fewer_parameters_than_lora_r8():
    """Question answering in a format the base never saw (it read facts, never a question), trained on three
    phrasings of each question and scored by greedy generation of the whole answer (capital, full stop, EOS):
    the interventions alone must carry each question to its answer. (A 2-block model does not generalise to
    unseen phrasings reliably; a real one is what the LoReFT paper measures.)"""
    tokenizer = _fact_tokenizer()
    base = _pretrained_on_facts(tokenizer)
    lora_params = parameter_counts(apply_strategy(build_model("llama", vocab_size=len(tokenizer)), "lora",
                                                  lora_r=8))[0]
    reft = apply_strategy(base, "reft", reft=ReftSpec(layers="all", rank=4, first=0, last=4))
    reft_params = parameter_counts(reft)[0]
    assert reft_params * 10 <= lora_params, (reft_params, lora_params)

    seen = [(f"Question: {q.format(c=c)}\nAnswer:", f" {a}.") for q in QUESTIONS for c, a in zip(COUNTRIES, CAPITALS)]
    with reft.disable_adapter():
        before = _answers_greedily(reft, tokenizer, seen)
    assert before <= 0.25
    objective = intervening_on_prompts(build_objective("sft"))
    _train(reft, objective, _completion_examples(tokenizer, seen), tokenizer.pad_token_id, steps=150, lr=1e-2)
    assert _answers_greedily(reft, tokenizer, seen) >= 0.9
