"""`tunesmith eval`: log-likelihood choice, eval loss, prompting, memory, and the command end to end.

Every model is a tiny Llama built in code; nothing is downloaded.
"""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CORPUS, chat_rows, write_jsonl
from tunesmith.cli import main
from tunesmith.config import config_from_dict
from tunesmith.data.formats import Row, load_rows
from tunesmith.data.templates import install_template
from tunesmith.data.tokenize import IGNORE_INDEX, encode_chat, tokenize_rows
from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval import harness
from tunesmith.eval.command import eval_command
from tunesmith.eval.harness import choice_metrics, generate_metrics, loss_metrics, run_set
from tunesmith.eval.items import item_from_row
from tunesmith.eval.loglik import continuation_logps
from tunesmith.eval.prompting import FewShotPool, Item, Prompter, item_key
from tunesmith.eval.sets import EvalSet, Settings
from tunesmith.objectives import build_objective

CONFIG = Path(__file__).parent.parent / "configs" / "eval.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The conftest tokenizer with the chatml template (its markers are already special tokens)."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=400)
    assert install_template(tokenizer, "chatml") == []
    return tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, chat_tokenizer) -> dict[str, Path]:
    """A tiny base model with a chat template, and a LoRA adapter on it saved in the PEFT format."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.model.load import load_model

    root = tmp_path_factory.mktemp("eval-models")
    base = save_tiny(root / "base", build_model("llama", vocab_size=len(chat_tokenizer)), chat_tokenizer)
    torch.manual_seed(1)
    adapted = get_peft_model(load_model(str(base)), LoraConfig(  # B random: the adapter changes the outputs
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    adapted.save_pretrained(root / "adapter")
    chat_tokenizer.save_pretrained(root / "adapter")
    return {"base": base, "adapter": root / "adapter"}


def biased_model(vocab_size: int, bias: dict[int, float]):
    """A tiny Llama whose output head is zero weights plus `bias`: at every position the next-token
    distribution is softmax(bias), whatever the input, so log-probs are known by hand."""
    model = build_model("llama", vocab_size=vocab_size)
    head = torch.nn.Linear(model.config.hidden_size, vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    model.lm_head = head
    return model.eval()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------- choice


def test_option_log_likelihood_by_hand(tokenizer):
    """With bias 5 on "z" and 0 elsewhere, log p(z) = 5 - L with L = log(e^5 + 399) at every position, so
    "zzz" scores 3 (5 - L) and "q" scores -L."""
    z, q = ids(tokenizer, "z")[0], ids(tokenizer, "q")[0]
    assert ids(tokenizer, "zzz") == [z, z, z]
    model = biased_model(len(tokenizer), {z: 5.0})
    lse = math.log(math.exp(5) + len(tokenizer) - 1)
    logps = continuation_logps(model, [([7, 8], [z, z, z]), ([7], [q]), ([9, 9, 9, 9], [z])], tokenizer.pad_token_id,
                               batch_size=2)
    assert logps == pytest.approx([3 * (5 - lse), -lse, 5 - lse], abs=1e-5)


def test_choice_accuracy_with_a_forced_preference(tokenizer):
    """The head always prefers "z": items whose correct option is "z" are right, those with "q" wrong (2 of 3)."""
    model = biased_model(len(tokenizer), {ids(tokenizer, "z")[0]: 8.0})
    items = [Item(f"f:{i}", f"Question {i}:", gold, ("q", "z")) for i, gold in enumerate(["z", "q", "z"])]
    metrics = choice_metrics(model, tokenizer, items, Prompter(tokenizer), batch_size=2)
    assert metrics == {"accuracy": pytest.approx(2 / 3), "n": 3, "truncated": 0}


@pytest.mark.parametrize("normalize,winner", [("none", " capital"), ("token", "zzz"), ("char", " capital")])
def test_length_normalisation_changes_the_winner(tokenizer, normalize, winner):
    """Bias 5 on "z", 4 on " capital" (one token, 8 characters), L = log(e^5 + e^4 + 398) = 6.3986:
      none   " capital" 4 - L = -2.40     "zzz" 3 (5 - L) = -4.20       -> " capital"
      token  -2.40 / 1 = -2.40            -4.20 / 3 = -1.40             -> "zzz"
      char   -2.40 / 8 = -0.30            -4.20 / 3 = -1.40             -> " capital"
    """
    z, capital = ids(tokenizer, "z")[0], ids(tokenizer, " capital")
    assert len(capital) == 1 and ids(tokenizer, "zzz") == [z, z, z]
    model = biased_model(len(tokenizer), {z: 5.0, capital[0]: 4.0})
    item = Item("f:1", "Pick one:", winner, (" capital", "zzz"))
    metrics = choice_metrics(model, tokenizer, [item], Prompter(tokenizer), length_normalize=normalize)
    assert metrics["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------- loss


def test_eval_loss_equals_the_training_loss(chat_tokenizer, tmp_path):
    """The eval loss of a set is the SFT objective's loss on the same examples (same masks, same truncation),
    token-weighted, so it does not depend on the batch size; it also equals the training loop's own."""
    from accelerate import Accelerator

    from tunesmith.train.loop import evaluate_loss

    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(7))
    model = build_model("llama", vocab_size=len(chat_tokenizer)).eval()
    for max_seq_len in (256, 50):  # 50 truncates every conversation and drops three (no answer token left)
        examples, report = tokenize_rows(chat_tokenizer, load_rows(path), max_seq_len)
        batch = build_objective("sft").collate(examples, chat_tokenizer.pad_token_id)
        with torch.no_grad():
            out = build_objective("sft").loss(model, batch)
        for batch_size in (7, 3):
            metrics = loss_metrics(model, chat_tokenizer, load_rows(path), batch_size, max_seq_len)
            assert metrics["loss"] == pytest.approx(float(out.loss_sum) / out.num_units, rel=1e-5)
            assert metrics["tokens"] == out.num_units
            assert (metrics["n"], metrics["truncated"], metrics["dropped"]) == (
                len(examples), report.truncated, report.dropped_no_loss_tokens)
            assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
        loop_loss = evaluate_loss(model, build_objective("sft"), examples, 2, chat_tokenizer.pad_token_id,
                                  Accelerator(cpu=True))
        assert metrics["loss"] == pytest.approx(loop_loss, rel=1e-5)


def test_token_accuracy_of_a_forced_model(tokenizer, tmp_path):
    """A head that always predicts "z": the token accuracy of a text is the share of its loss tokens that are
    "z" (each text: z z z z EOS, 4 of the 5 predicted tokens, since the first token is never predicted)."""
    z = ids(tokenizer, "z")[0]
    path = write_jsonl(tmp_path / "z.jsonl", [{"text": "zzzzz"}, {"text": "zzzzz"}])
    metrics = loss_metrics(biased_model(len(tokenizer), {z: 9.0}), tokenizer, load_rows(path), 2)
    assert metrics["tokens"] == 10
    assert metrics["token_accuracy"] == pytest.approx(8 / 10)


# ---------------------------------------------------------------------------------------------------- memory


def _hwm_kib() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))


def peak_memory(fn) -> tuple[int, int]:
    """(peak Python allocations in bytes, peak resident-set growth in KiB) while `fn` runs."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
    before = _hwm_kib()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, _hwm_kib() - before


@pytest.mark.parametrize("kind", ["loss", "choice"])
def test_memory_stays_flat_as_the_set_grows(kind, tokenizer, tmp_path, monkeypatch):
    """Rows are read one batch at a time: at the first forward pass only the first batch has been read. And 10x
    the rows stay within generous bounds of the 1x run in peak RSS and in Python allocations; keeping the logits
    would add ~0.6 MB per batch (8 x ~50 tokens x 400 x 4 bytes), 30 MB over the 10x set."""
    model = build_model("llama", vocab_size=len(tokenizer)).eval()
    text = "The capital of France is Paris. " * 4
    rows = ({"text": text} if kind == "loss" else {"question": text, "choices": ["Paris", "Lima"], "answer": 0})
    paths = {n: write_jsonl(tmp_path / f"{n}.jsonl", [rows] * n) for n in (40, 400)}
    run = {n: (lambda p=p: run_set(model, tokenizer, EvalSet("s", str(p), kind), Settings(batch_size=8)))
           for n, p in paths.items()}

    reader = "read_rows" if kind == "loss" else "read_items"
    read, pulled, at_forward = getattr(harness, reader), [0], []

    def counted(*args, **kwargs):
        for row in read(*args, **kwargs):
            pulled[0] += 1
            yield row

    with monkeypatch.context() as patch:
        patch.setattr(harness, reader, counted)
        hook = model.register_forward_pre_hook(lambda module, args: at_forward.append(pulled[0]))
        assert run[400]()["metrics"]["n"] == 400
        hook.remove()
    assert at_forward[0] == 8 and at_forward[-1] == 400

    small, large = peak_memory(run[40]), peak_memory(run[400])
    assert large[1] < small[1] + 12 * 1024, (small, large)  # KiB
    assert large[0] < 2 * small[0] + 200_000, (small, large)  # bytes


# ---------------------------------------------------------------------------------------------------- prompting


QUESTIONS = [f"What is {a} plus {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]


def chat_item(question: str, answer: str = "x", source: str = "eval:1") -> Item:
    return Item(source, ({"role": "user", "content": question},), answer)


def test_few_shot_never_shows_the_item_itself(chat_tokenizer):
    """The pool holds every eval item, and duplicates of them differing only in case and spacing. With k = 3 of
    4 distinct prompts, each item's exemplars must be exactly the other three."""
    pool_items = [chat_item(q, f"answer {i}", f"train:{i}") for i, q in enumerate(QUESTIONS)]
    pool_items += [chat_item("  " + q.upper().replace(" ", "  "), "dup", f"train:dup{i}")
                   for i, q in enumerate(QUESTIONS)]
    pool = FewShotPool(pool_items, k=3, seed=0)
    prompter = Prompter(chat_tokenizer, fewshot=pool)
    for question in QUESTIONS:
        query = chat_item(question)
        shots = pool.draw(query)
        assert sorted(item_key(s) for s in shots) == sorted(item_key(chat_item(q)) for q in QUESTIONS if q != question)
        turns = prompter.prompt(query)
        users = [t["content"] for t in turns if t["role"] == "user"]
        assert [" ".join(u.casefold().split()) for u in users].count(item_key(query)) == 1
        assert users[-1] == question and len(turns) == 7  # 3 exemplars (user + assistant) and the question
        assert pool.draw(query) == shots  # the same draw every time
    with pytest.raises(DataError, match="4-shot needs 4 exemplars but .* has only 3"):
        FewShotPool(pool_items, k=4).draw(chat_item(QUESTIONS[0]))


def test_chat_prompt_is_the_training_prompt(chat_tokenizer):
    """The prompt ids of a chat item are the training ids before the first supervised token."""
    messages = ({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 1 plus 2?"},
                {"role": "assistant", "content": "It is 3."})
    item = item_from_row(Row("f:1", messages=messages))
    input_ids, labels = encode_chat(chat_tokenizer, messages)
    start = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert Prompter(chat_tokenizer).token_ids(item) == input_ids[:start]
    assert item.answer == "It is 3."


def test_plain_prompt_for_a_model_without_chat_template(tokenizer):
    """Completion items: exemplars as prompt + answer, blank-line separated, then the question; chain of thought
    appends the instruction to every question. Tokenised with BOS where the tokenizer adds one."""
    pool = FewShotPool([Item("t:1", "Q: 1+1?\nA:", " 2"), Item("t:2", "Q: 2+2?\nA:", " 4")], k=2)
    query = Item("e:1", "Q: 3+3?\nA:", " 6")
    text = Prompter(tokenizer, fewshot=pool).prompt(query)
    blocks = text.split("\n\n")
    assert sorted(blocks[:2]) == ["Q: 1+1?\nA: 2", "Q: 2+2?\nA: 4"] and blocks[2] == "Q: 3+3?\nA:"
    cot = Prompter(tokenizer, cot_instruction="Think.").prompt(query)
    assert cot == "Q: 3+3?\nA: Think."
    chat_as_text = Prompter(tokenizer).prompt(chat_item("What is 3 plus 3?"))
    assert chat_as_text == "What is 3 plus 3?\n"  # no template: the turns as plain text, the answer on the next line
    assert Prompter(tokenizer).token_ids(query) == tokenizer("Q: 3+3?\nA:")["input_ids"]
    with pytest.raises(ConfigError, match="prompt_format: 'chat' but the tokenizer has no chat template"):
        Prompter(tokenizer, "chat")


def test_chain_of_thought_scores_the_extracted_answers(chat_tokenizer, monkeypatch):
    """Generations are planted: exact match and numeric compare the answers read off the reasoning (2 of 3
    right; one has no answer), a user's scorer sees the whole text."""
    planted = ["2 + 2 = 4. The answer is 4.", "3 * 3 = 9, so 9", "I am not sure."]
    queue = iter(planted)
    monkeypatch.setattr(harness, "generate_token_ids",
                        lambda model, prompts, *a, **k: [ids(chat_tokenizer, next(queue)) for _ in prompts])
    items = [chat_item("2 + 2?", "#### 4"), chat_item("3 * 3?", "9"), chat_item("1 + 1?", "The answer is 2.")]
    model = build_model("llama", vocab_size=len(chat_tokenizer))

    def length(prediction, reference):
        return len(prediction)

    metrics, examples = generate_metrics(model, chat_tokenizer, items, Prompter(chat_tokenizer, cot_instruction="Go."),
                                         ["exact_match", "numeric"], length, batch_size=2, cot=True)
    assert metrics == {"exact_match": pytest.approx(2 / 3), "numeric": pytest.approx(2 / 3),
                       "length": pytest.approx(sum(map(len, planted)) / 3), "n": 3, "truncated": 0, "no_answer": 1}
    assert [e["answer"] for e in examples] == ["4", "9", ""]


def test_plain_answers_end_at_a_blank_line(tokenizer, monkeypatch):
    monkeypatch.setattr(harness, "generate_token_ids",
                        lambda model, prompts, *a, **k: [ids(tokenizer, " 6\n\nQ: 4+4?\nA: 8")] * len(prompts))
    model = build_model("llama", vocab_size=len(tokenizer))
    metrics, examples = generate_metrics(model, tokenizer, [Item("e:1", "Q: 3+3?\nA:", " 6")], Prompter(tokenizer))
    assert metrics["exact_match"] == 1.0 and examples[0]["prediction"] == "6"


def test_sampling_repeats_with_the_seed(chat_tokenizer, tmp_path):
    """The same seed gives the same samples; a nucleus so small that it holds only the most likely token
    (top_p -> 0) samples the greedy answer."""
    path = write_jsonl(tmp_path / "qa.jsonl", chat_rows(4))
    model = build_model("llama", vocab_size=len(chat_tokenizer)).eval()

    def predictions(**decoding) -> list[str]:
        spec = EvalSet("qa", str(path), "generate", max_new_tokens=4, **decoding)
        return [e["prediction"] for e in run_set(model, chat_tokenizer, spec, Settings(seed=3, num_examples=4))
                ["examples"]]

    state = torch.get_rng_state()
    assert predictions(temperature=1.0, top_p=0.9) == predictions(temperature=1.0, top_p=0.9)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    assert predictions(temperature=1.0, top_p=1e-9) == predictions()


# ---------------------------------------------------------------------------------------------------- command


def write_sets(root: Path) -> dict[str, Path]:
    """A loss set, a choice set, a few-shot generation set and its exemplar file."""
    root.mkdir(parents=True, exist_ok=True)
    choice = [{"question": f"What is {a} plus 1?", "choices": [str(a + 1), str(a + 2)], "answer": a % 2}
              for a in range(5)]
    return {"loss": write_jsonl(root / "loss.jsonl", chat_rows(5, seed=1)),
            "choice": write_jsonl(root / "choice.jsonl", choice),
            "qa": write_jsonl(root / "qa.jsonl", chat_rows(4, seed=2)),
            "shots": write_jsonl(root / "shots.jsonl", chat_rows(6, seed=3))}


def write_eval_config(tmp_path: Path, model: Path, files: dict[str, Path], out: str = "out") -> Path:
    cfg = {"model": {"name_or_path": str(model)}, "train": {"output_dir": str(tmp_path / "run")},
           "data": {"max_seq_len": 128},
           "eval": {"batch_size": 4, "output_dir": str(tmp_path / out), "general": ["loss"], "sets": [
               {"name": "loss", "path": str(files["loss"]), "kind": "loss"},
               {"name": "choice", "path": str(files["choice"]), "kind": "choice", "length_normalize": "char"},
               {"name": "qa", "path": str(files["qa"]), "kind": "generate", "max_new_tokens": 4, "shots": 2,
                "fewshot_path": str(files["shots"]), "metrics": ["exact_match", "rouge_l", "chrf"]},
           ]},
           "tracking": {"log_level": "warning"}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_eval(path: Path) -> dict:
    return json.loads((path / "eval.json").read_text())


def test_eval_end_to_end_on_a_model_dir(dirs, tmp_path):
    cfg = write_eval_config(tmp_path, dirs["base"], write_sets(tmp_path / "data"))
    assert main(["eval", str(cfg)]) == 0
    report = read_eval(tmp_path / "out")
    assert report["model"] == str(dirs["base"]) and report["kind"] == "model"
    assert "forgetting" not in report  # a base model has no baseline
    sets = report["sets"]
    assert set(sets) == {"loss", "choice", "qa"}
    assert set(sets["loss"]["metrics"]) == {"loss", "perplexity", "token_accuracy", "n", "tokens", "truncated",
                                            "dropped"}
    assert sets["loss"]["general"] is True and sets["loss"]["metrics"]["n"] == 5
    assert set(sets["choice"]["metrics"]) == {"accuracy", "n", "truncated"} and sets["choice"]["metrics"]["n"] == 5
    assert set(sets["qa"]["metrics"]) == {"exact_match", "rouge_l", "chrf", "n", "truncated"}
    assert len(sets["qa"]["examples"]) == 3
    md = (tmp_path / "out" / "eval.md").read_text()
    assert md.startswith("# Evaluation") and "| loss | loss | 5 | loss |" in md


def test_eval_adapter_reports_forgetting_against_its_base(dirs, tmp_path):
    """A PEFT adapter dir loads as base + adapter; the general set runs on the base too, and the forgetting
    section is exactly the difference of the two models' results."""
    files = write_sets(tmp_path / "data")
    assert main(["eval", str(write_eval_config(tmp_path, dirs["adapter"], files, "tuned"))]) == 0
    assert main(["eval", str(write_eval_config(tmp_path, dirs["base"], files, "base"))]) == 0
    tuned, base = read_eval(tmp_path / "tuned"), read_eval(tmp_path / "base")
    assert tuned["kind"] == "adapter"
    after, before = tuned["sets"]["loss"]["metrics"], base["sets"]["loss"]["metrics"]
    assert after["loss"] != pytest.approx(before["loss"])  # the adapter changes the model
    f = tuned["forgetting"]
    assert (f["before"], f["after"]) == (str(dirs["base"]), str(dirs["adapter"]))
    ppl = f["sets"]["loss"]["perplexity"]
    assert ppl["before"] == pytest.approx(before["perplexity"]) and ppl["after"] == pytest.approx(after["perplexity"])
    assert ppl["change"] == pytest.approx(after["perplexity"] - before["perplexity"])
    acc = f["sets"]["loss"]["accuracy"]
    assert acc["metric"] == "token_accuracy"
    assert acc["change"] == pytest.approx(after["token_accuracy"] - before["token_accuracy"])
    assert "## Forgetting" in (tmp_path / "tuned" / "eval.md").read_text()
    assert (tmp_path / "tuned" / "eval.png").stat().st_size > 0  # base vs tuned bars
    assert not (tmp_path / "base" / "eval.png").exists()  # nothing to compare


def test_compare_reports_the_difference_of_two_evals(dirs, tmp_path):
    files = write_sets(tmp_path / "data")
    for name, model in (("a", dirs["base"]), ("b", dirs["adapter"])):
        assert main(["eval", str(write_eval_config(tmp_path, model, files, name))]) == 0
    cfg = write_eval_config(tmp_path, dirs["base"], files, "cmp")
    assert main(["eval", str(cfg), "--compare", str(dirs["base"]), str(dirs["adapter"])]) == 0
    a, b, cmp = read_eval(tmp_path / "a"), read_eval(tmp_path / "b"), read_eval(tmp_path / "cmp")
    assert cmp["a"]["model"] == str(dirs["base"]) and cmp["b"]["kind"] == "adapter"
    for name in ("loss", "choice", "qa"):
        metrics_a, metrics_b = a["sets"][name]["metrics"], b["sets"][name]["metrics"]
        expected = {k: metrics_b[k] - metrics_a[k] for k in metrics_a
                    if k not in ("n", "tokens", "truncated", "dropped")}
        assert cmp["delta"][name] == pytest.approx(expected)
    assert cmp["forgetting"]["sets"]["loss"]["perplexity"]["change"] == pytest.approx(
        b["sets"]["loss"]["metrics"]["perplexity"] - a["sets"]["loss"]["metrics"]["perplexity"])
    assert (tmp_path / "cmp" / "eval.md").read_text().startswith("# Comparison")
    assert (tmp_path / "cmp" / "eval.png").stat().st_size > 0


def test_eval_a_training_checkpoint_and_final(model_dirs, tmp_path):
    """checkpoints/step-N/ is rebuilt from the run's config.yaml; at the last step it is the same model as
    final/ (a PEFT adapter), so both give the same loss."""
    from tunesmith.config import load_config
    from tunesmith.train.run import train

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    run = tmp_path / "run"
    train(load_config(None, [f"model.name_or_path={model_dirs['llama']}", f"data.train={data}",
                             "data.template=chatml", "data.max_seq_len=128", f"train.output_dir={run}",
                             "train.max_steps=1", "train.micro_batch_size=4", "train.lr=1e-2",
                             "tracking.progress_bar=false", f"data.cache_dir={tmp_path / 'cache'}"]))
    results = {}
    for name in ("checkpoints/step-1", "final"):
        out = tmp_path / name.replace("/", "-")
        cfg = {"model": {"name_or_path": str(run / name)}, "data": {"max_seq_len": 128},
               "eval": {"output_dir": str(out), "sets": [{"name": "train", "path": str(data), "kind": "loss",
                                                          "general": True}]}}
        results[name] = eval_command(config_from_dict(cfg))
    step, final = results["checkpoints/step-1"], results["final"]
    assert (step["kind"], final["kind"]) == ("checkpoint", "adapter")
    assert step["sets"]["train"]["metrics"]["loss"] == pytest.approx(final["sets"]["train"]["metrics"]["loss"],
                                                                     rel=1e-6)
    assert final["forgetting"]["before"] == str(model_dirs["llama"])
    assert step["forgetting"]["sets"]["train"]["perplexity"]["change"] < 0  # a step at lr 1e-2 fits the data


def test_shipped_eval_config_runs(dirs, tmp_path):
    """configs/eval.yaml as shipped, with its model and files pointed at tiny ones."""
    raw = yaml.safe_load(CONFIG.read_text())
    data = tmp_path / "data"
    data.mkdir()
    files = {
        "chat": write_jsonl(data / "chat.jsonl", chat_rows(4)),
        "text": write_jsonl(data / "text.jsonl", [{"text": line} for line in CORPUS[:7]]),
        "math": write_jsonl(data / "math.jsonl", [{"prompt": f"Q: {a} plus {a}?\nA:",
                                                   "completion": f" {a} + {a} = {2 * a}. The answer is {2 * a}."}
                                                  for a in range(5)]),
        "reviews": write_jsonl(data / "reviews.jsonl", [{"text": "Great film.", "label": "positive"},
                                                        {"text": "Dull.", "label": "negative"}]),
    }
    for s in raw["eval"]["sets"]:
        kind = "math" if s.get("cot") else "reviews" if s["kind"] == "choice" else (
            "text" if s["name"] in raw["eval"]["general"] else "chat")
        s["path"] = str(files[kind])
        if s.get("fewshot_path"):
            s["fewshot_path"] = str(files[kind])
        s["max_new_tokens"] = 2 if s["kind"] == "generate" else s.get("max_new_tokens", 64)
    raw["model"]["name_or_path"] = str(dirs["adapter"])
    raw["eval"]["output_dir"] = str(tmp_path / "out")
    raw["data"]["max_seq_len"] = 256
    report = eval_command(config_from_dict(raw))
    assert set(report["sets"]) == {s["name"] for s in raw["eval"]["sets"]}
    assert set(report["forgetting"]["sets"]) == set(raw["eval"]["general"])
    assert (tmp_path / "out" / "eval.md").is_file()


def test_generation_metrics_on_a_sample(chat_tokenizer):
    from tunesmith.eval.harness import generation_metrics

    rows = [Row("f:1", messages=tuple(r["messages"][-2:])) for r in chat_rows(5)]
    model = build_model("llama", vocab_size=len(chat_tokenizer))
    metrics = generation_metrics(model, chat_tokenizer, rows, ["exact_match", "rouge_l"], max_new_tokens=2, limit=3)
    assert metrics["n"] == 3 and set(metrics) == {"exact_match", "rouge_l", "n", "truncated"}


# ---------------------------------------------------------------------------------------------------- errors


def error_line(capsys, cfg: Path, *overrides: str) -> str:
    assert main(["eval", str(cfg), *overrides]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def write_bad_config(tmp_path: Path, **set_fields) -> Path:
    data = write_jsonl(tmp_path / "qa.jsonl", chat_rows(2))
    cfg = {"model": {"name_or_path": "org/never-loaded"},
           "eval": {"sets": [{"name": "qa", "path": str(data), **set_fields}]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("fields,expected", [
    ({"metrics": ["rouge"]}, ["eval.sets[0].metrics[0]", "'rouge'", "did you mean 'rouge_l'"]),
    ({"path": "missing/qa.jsonl"}, ["eval.sets[0].path", "missing/qa.jsonl: data file not found"]),
    ({"shots": 2}, ["eval.sets[0].fewshot_path: required for shots: 2"]),
    ({"shots": 1, "fewshot_path": "nope.jsonl"}, ["eval.sets[0].fewshot_path", "nope.jsonl: data file not found"]),
    ({"kind": "loss", "cot": True}, ["eval.sets[0].cot", "not to loss sets"]),
    ({"shot": 2}, ["unknown config key 'eval.sets[0].shot'", "did you mean 'eval.sets[0].shots'"]),
    ({"scorer": "no_such_module_xyz:f"}, ["eval.sets[0].scorer: cannot import 'no_such_module_xyz'"]),
    ({"kind": "choise"}, ["eval.sets[0].kind", "did you mean 'choice'"]),
    ({"top_p": 0}, ["eval.sets[0].top_p"]),
])
def test_bad_config_names_the_key_or_file(tmp_path, capsys, fields, expected):
    line = error_line(capsys, write_bad_config(tmp_path, **fields))
    for text in expected:
        assert text in line


def test_bad_general_name_and_no_sets(tmp_path, capsys):
    cfg = write_bad_config(tmp_path)
    line = error_line(capsys, cfg, "eval.general=[qaa]")
    assert "eval.general[0]: no eval set named 'qaa' (did you mean 'qa'?)" in line
    assert "eval.sets: no eval sets" in error_line(capsys, cfg, "eval.sets=[]")


def test_bad_choice_row_names_file_line_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 0},
                                               {"question": "Q?", "choices": ["a", "b"], "answer": "c"}])
    model = build_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(DataError, match=r"mc.jsonl:2: answer: 'c' is neither one of the options"):
        run_set(model, tokenizer, EvalSet("mc", str(path), "choice"))
