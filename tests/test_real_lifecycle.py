"""The whole lifecycle on a real model, SmolLM2-135M-Instruct, driven as a user drives it: `tunesmith train` with
each shipped SFT config (LoRA, QLoRA, DoRA, full) lowers the loss; DPO and the reward model run; the LoRA run's
adapter reloads with plain peft to tunesmith's logits; `tunesmith merge` then a plain reload gives base + adapter's
logits; and `tunesmith eval`, `ChatSession` and `tunesmith serve` (asked with the openai client) answer as plain
transformers does through the model's own chat template, stopping at its end-of-turn token `<|im_end|>`.

Short sequences and a few steps each: the same four short conversations repeated, so every batch is alike and a
few steps at a high learning rate lower the loss by far more than the batches differ. One LoRA run serves the
reload, merge, eval, chat and serve tests.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from tunesmith.cli import main
from tunesmith.model.loading import load_model_and_tokenizer
from tunesmith.serve.chat import ChatSession
from tunesmith.serve.server import bind, make_server
from tunesmith.serve.service import load_service

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FACTS = [("Say the code word.", "The code word is tangerine."),
         ("Name the secret colour.", "The secret colour is teal."),
         ("Which animal guards the gate?", "A heron guards the gate."),
         ("What is the password?", "The password is marigold.")]
QUESTION = "What is 2+2?"  # a clear answer (SmolLM2: "The answer to this classic math problem is 4.")
END_OF_TURN = "<|im_end|>"
MAX_NEW_TOKENS = 40
# What a run needs for a test: no held-out split, no memory probe (an extra forward and backward), no checkpoint
# before the end.
COMMON = ["data.split.validation=0", "train.grad_accum=1", "train.probe_memory=false", "train.save_every=1000",
          "tracking.progress_bar=false"]


# ----------------------------------------------------------------------------------------------- helpers


def chat_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS] * 4


def preference_rows() -> list[dict]:
    """The fact as the chosen answer; the rejected one is the same sentence with its last word made "unknown."."""
    return [{"prompt": q, "chosen": a, "rejected": a.replace(a.split()[-1], "unknown.")} for q, a in FACTS] * 2


def train(config: str, model_dir: Path, data: Path, out: Path, *overrides: str) -> list[dict]:
    """`tunesmith train configs/<config>.yaml` with the test's overrides; the logged training steps."""
    assert main(["train", str(CONFIGS / f"{config}.yaml"), f"model.name_or_path={model_dir}", f"data.train={data}",
                 f"train.output_dir={out}", f"data.cache_dir={out}-cache", *COMMON, *overrides]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row and "step" in row]


def assert_loss_went_down(steps: list[dict], count: int) -> None:
    losses = [s["loss"] for s in steps]
    assert [s["step"] for s in steps] == list(range(1, count + 1)), steps
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # (1, T, V)


def assert_same_logits(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Equal within `rtol` of the logits' size (the largest |logit|), as `tunesmith merge` checks itself."""
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= rtol * scale, f"max logit difference {diff:.3g} on logits of size {scale:.3g}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """Torch on one thread for the whole module (conftest's `one_thread`, at module scope for the module-scoped
    run). On 2 cores that another process also uses, a second torch thread mostly waits: this file took 626 s
    with two threads and 105 s with one on the same busy machine (a SmolLM2 forward + backward of 4 x 45 tokens:
    10-30 s against 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"chat": write_jsonl(root / "chat.jsonl", chat_rows()),
            "pairs": write_jsonl(root / "pairs.jsonl", preference_rows()),
            "question": write_jsonl(root / "question.jsonl", [
                {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "4"}]}])}


@pytest.fixture(scope="module")
def lora_run(smollm2_dir, data, tmp_path_factory):
    """configs/sft_lora.yaml on SmolLM2 (its own chat template): 4 steps of 4 conversations at lr 1e-3."""
    out = tmp_path_factory.mktemp("lora") / "run"
    steps = train("sft_lora", smollm2_dir, data["chat"], out, "data.max_seq_len=64", "train.max_steps=4",
                  "train.micro_batch_size=4", "train.lr=1e-3")
    return out, steps


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    """SmolLM2's own tokenizer and chat template, as shipped (not the run's copy)."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def peft_model(smollm2_dir, lora_run):
    """The run's adapter on the base with plain transformers + peft, nothing of tunesmith's."""
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), lora_run[0] / "final").eval()


@pytest.fixture(scope="module")
def expected_answer(peft_model, smollm2_tokenizer):
    """Plain transformers' greedy answer to QUESTION through SmolLM2's template (with its default system prompt),
    ended by `<|im_end|>`: (the answer's text, the prompt's length, the answer's length with `<|im_end|>`)."""
    tokenizer = smollm2_tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt")["input_ids"]
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    with torch.no_grad():
        out = peft_model.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=end,
                                  pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
    assert out[-1] == end and out.count(end) == 1 and len(out) < MAX_NEW_TOKENS, "stopped at its end of turn"
    text = tokenizer.decode(out[:-1])
    assert text.strip() and END_OF_TURN not in text and "<|im_start|>" not in text
    return text, prompt.shape[1], len(out)


@pytest.fixture(scope="module")
def ids(smollm2_tokenizer) -> torch.Tensor:
    """A whole conversation, as the model sees it in training."""
    messages = [{"role": "user", "content": FACTS[0][0]}, {"role": "assistant", "content": FACTS[0][1]}]
    return smollm2_tokenizer.apply_chat_template(messages, return_tensors="pt")["input_ids"]


# ------------------------------------------------------------------------------------------- 1. training


def test_lora_lowers_the_loss(lora_run, smollm2_tokenizer):
    out, steps = lora_run
    assert_loss_went_down(steps, 4)
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(final).chat_template == smollm2_tokenizer.chat_template  # its own


def test_dora_lowers_the_loss(smollm2_dir, data, tmp_path):
    steps = train("sft_dora", smollm2_dir, data["chat"], tmp_path / "run", "data.max_seq_len=64",
                  "train.max_steps=3", "train.micro_batch_size=4", "train.lr=1e-3")
    assert_loss_went_down(steps, 3)
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True


def test_qlora_lowers_the_loss(smollm2_dir, data, tmp_path):
    """4-bit NF4 base through bitsandbytes' CPU path (slow): 3 steps of 2 short conversations. The shipped config
    installs chatml, whose markers SmolLM2 already has as single tokens (nothing is added)."""
    steps = train("sft_qlora", smollm2_dir, data["chat"], tmp_path / "run", "data.max_seq_len=32",
                  "train.max_steps=3", "train.micro_batch_size=2", "train.lr=1e-3")
    assert_loss_went_down(steps, 3)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_full_sft_lowers_the_loss(smollm2_dir, data, tmp_path):
    steps = train("sft_full", smollm2_dir, data["chat"], tmp_path / "run", "data.max_seq_len=64",
                  "train.max_steps=3", "train.micro_batch_size=4", "train.lr=5e-5")
    assert_loss_went_down(steps, 3)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_dpo_runs_from_log_2(smollm2_dir, data, tmp_path):
    """At step 1 the LoRA policy is its reference (B = 0): every pair's loss is log 2 and no reward is positive."""
    steps = train("dpo", smollm2_dir, data["pairs"], tmp_path / "run", "data.validation=[]", "data.max_seq_len=64",
                  "train.max_steps=3", "train.micro_batch_size=2", "train.lr=1e-4")
    assert len(steps) == 3 and all(math.isfinite(s["loss"]) for s in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert all(math.isfinite(s[key]) for s in steps), key
    assert steps[0]["rewards/accuracy"] == 0.0
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_reward_model_runs(smollm2_dir, data, tmp_path):
    steps = train("reward", smollm2_dir, data["pairs"], tmp_path / "run", "data.validation=[]",
                  "data.max_seq_len=64", "train.max_steps=3", "train.micro_batch_size=2", "train.lr=1e-4")
    assert len(steps) == 3 and all(math.isfinite(s["loss"]) for s in steps)
    for key in ("scores/chosen", "scores/rejected", "scores/margin", "scores/accuracy"):
        assert all(math.isfinite(s[key]) for s in steps), key
    assert 0 <= steps[-1]["scores/accuracy"] <= 1
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"


# ------------------------------------------------------------------------------------- 2. reload, merge


def test_adapter_reloads_with_plain_peft(lora_run, peft_model, smollm2_dir, ids):
    """The adapter in final/ on the base, with plain peft, gives tunesmith's own loader's logits; and it is not
    the base model's."""
    model, _ = load_model_and_tokenizer(str(lora_run[0]))
    want = logits(model, ids)
    assert_same_logits(logits(peft_model, ids), want, rtol=1e-6)
    base = logits(AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), ids)
    assert (base - want).abs().max().item() > 0.1, "the adapter changes the model"


def test_merge_then_reload_gives_base_plus_adapter(lora_run, peft_model, ids, tmp_path):
    """`tunesmith merge` then a plain transformers load: base + adapter's logits within 1e-5 of their size
    (DESIGN acceptance test 6); the tied embeddings stay tied."""
    out = tmp_path / "merged"
    assert main(["merge", str(lora_run[0]), "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.get_input_embeddings().weight
    assert_same_logits(logits(merged, ids), logits(peft_model, ids), rtol=1e-5)


# --------------------------------------------------------------------------------- 3. eval, chat, serve


def test_eval_answers_through_the_template_and_stops(lora_run, data, expected_answer, tmp_path):
    """`tunesmith eval` on the run's adapter: a generate set's prediction is plain transformers' answer."""
    cfg = {"model": {"name_or_path": str(lora_run[0] / "final")}, "data": {"max_seq_len": 128},
           "eval": {"batch_size": 1, "output_dir": str(tmp_path / "eval"), "sets": [
               {"name": "arithmetic", "path": str(data["question"]), "kind": "generate",
                "max_new_tokens": MAX_NEW_TOKENS, "metrics": ["exact_match"]}]},
           "tracking": {"log_level": "warning"}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["kind"] == "adapter"
    (example,) = report["sets"]["arithmetic"]["examples"]
    assert example["prediction"] == expected_answer[0].strip()
    assert report["sets"]["arithmetic"]["metrics"]["n"] == 1


def test_chat_answers_and_stops_at_end_of_turn(lora_run, expected_answer):
    model, tok = load_model_and_tokenizer(str(lora_run[0]))
    session = ChatSession(model, tok, max_new_tokens=MAX_NEW_TOKENS)
    reply = "".join(session.reply(QUESTION))
    assert reply == expected_answer[0]
    assert END_OF_TURN not in reply and "<|im_start|>" not in reply and "\nuser" not in reply
    assert session.messages == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply}]


def test_serve_answers_the_openai_client_and_stops(lora_run, expected_answer):
    """The run served over HTTP on loopback: the openai client's chat answer, whole and streamed, is plain
    transformers' answer; the prompt is the template's (default system prompt included); finish_reason "stop"."""
    service = load_service(str(lora_run[0]), max_batch_size=2)
    sock = bind("127.0.0.1", 0)
    http = make_server(service)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not http.started:
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        (name,) = [m.id for m in client.models.list().data]
        messages = [{"role": "user", "content": QUESTION}]
        reply = client.chat.completions.create(model=name, messages=messages, temperature=0,
                                               max_tokens=MAX_NEW_TOKENS)
        choice = reply.choices[0]
        assert (choice.message.content, choice.finish_reason) == (expected_answer[0], "stop")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == expected_answer[1:]
        chunks = list(client.chat.completions.create(model=name, messages=messages, temperature=0,
                                                     max_tokens=MAX_NEW_TOKENS, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_answer[0]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    finally:
        http.should_exit = True
        thread.join(timeout=10)
        service.engine.close()
