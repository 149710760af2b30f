"""`tunesmith serve` over real HTTP on loopback, driven by the official `openai` client: chat and completions,
streaming and not, sampling settings, stop strings, adapters selected by `model`, API key, OpenAI-shaped errors
and limits, 64 concurrent requests, usage counts, /health and /metrics; and the CLI serving from a subprocess."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_export import make_adapter
from tunesmith.data.templates import install_template
from tunesmith.demo.tiny import build_model, save_tiny
from tunesmith.eval.generate import prompt_ids
from tunesmith.serve.server import bind, make_server
from tunesmith.serve.service import Limits, load_service

KEY = "test-key-123"
ANSWER = "It is five."
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


def scripted_model_dir(path: Path, tokenizer, answer: str = ANSWER) -> Path:
    """A tiny Llama that answers every chat prompt with `answer` and then its end-of-turn token, built in code.

    Attention and MLP outputs are zeroed, so the logits depend on the current token only (a bigram model); the
    embeddings of the chain "\\n" -> answer tokens -> <|im_end|> are orthogonal directions, and the head maps each
    to the next token of the chain. A chat prompt ends with "assistant\\n", so greedy decoding writes the answer
    and stops: a known output with which to test streaming, stop tokens and usage counts.
    """
    tokenizer = _templated(tokenizer)
    model = build_model("llama", len(tokenizer), seed=1)
    chain = [prompt_ids(tokenizer, QUESTION)[-1]] + tokenizer(answer, add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), "the chain's tokens must be distinct"
    hidden = model.config.hidden_size
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))[0].T
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token] = basis[k]
            model.lm_head.weight[following] = 2 * basis[k]  # logit 2 * rms-normalised |basis| = 16, others ~0
    return save_tiny(path, model, tokenizer)


def _templated(tokenizer):
    """A copy with the chatml template (the session's shared tokenizer stays as it is)."""
    tokenizer = copy.deepcopy(tokenizer)
    install_template(tokenizer, "chatml")
    return tokenizer


def hf_greedy(model_dir, messages=None, *, text=None, max_new_tokens=8, adapter=None):
    """Greedy generation with plain transformers (+ peft): (text, number of generated tokens incl. the stop)."""
    tokenizer = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ids = (prompt_ids(tokenizer, messages) if messages is not None
           else tokenizer(text, add_special_tokens=True)["input_ids"])
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = model.eval().generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return tokenizer.decode(out, skip_special_tokens=True), len(out)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    """The scripted model served as "tiny-chat", with two random LoRA adapters "alpha" and "beta"."""
    root = tmp_path_factory.mktemp("serve")
    base = scripted_model_dir(root / "tiny-chat", tokenizer)
    templated = AutoTokenizer.from_pretrained(base)
    adapters = {name: make_adapter(base, templated, "lora", root / name, seed=seed, scale=0.5)
                for name, seed in (("alpha", 0), ("beta", 3))}
    service = load_service(str(base), [f"{n}={p}" for n, p in adapters.items()], max_batch_size=8,
                           limits=Limits(max_prompt_tokens=64, max_tokens_limit=48, max_request_bytes=4096),
                           api_key=KEY)
    sock = bind("127.0.0.1", 0)
    http = make_server(service)
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield SimpleNamespace(url=url, base=base, adapters=adapters, service=service, tokenizer=templated,
                          client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60))
    http.should_exit = True
    thread.join(timeout=10)
    service.engine.close()


def test_models_lists_the_base_and_each_adapter(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny-chat", "alpha", "beta"]
    assert server.client.models.retrieve("alpha").id == "alpha"


def test_chat_answers_stops_at_end_of_turn_and_counts_tokens(server):
    reply = server.client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0)
    choice = reply.choices[0]
    assert (choice.message.content, choice.finish_reason, choice.message.role) == (ANSWER, "stop", "assistant")
    answer_tokens = len(server.tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    assert reply.usage.prompt_tokens == len(prompt_ids(server.tokenizer, QUESTION))
    assert reply.usage.completion_tokens == answer_tokens + 1 == hf_greedy(server.base, QUESTION, max_new_tokens=20)[1]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_chat_streams_the_same_answer_as_server_sent_events(server):
    chunks = list(server.client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "streamed in pieces"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completion_matches_plain_transformers_greedy_and_stops_at_length(server):
    prompt = "The capital of France is"
    want, _ = hf_greedy(server.base, text=prompt, max_new_tokens=3)
    assert want == " five"[:len(want)] and want, "the bigram chain from ' is'"
    reply = server.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=3, temperature=0)
    assert reply.choices[0].text == want and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert reply.usage.prompt_tokens == len(server.tokenizer(prompt)["input_ids"])
    streamed = server.client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=3, temperature=0,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    several = server.client.completions.create(model="tiny-chat", prompt=[prompt, "Hello world"], max_tokens=3,
                                               temperature=0)
    assert [c.index for c in several.choices] == [0, 1] and several.choices[0].text == want[:len(
        several.choices[0].text)]


def test_adapters_are_selected_by_the_model_field(server):
    """Each adapter's answer equals plain peft's greedy generation of base + that adapter."""
    answers = {}
    for name in ("alpha", "beta", "tiny-chat"):
        reply = server.client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=6)
        adapter = server.adapters.get(name)
        want = hf_greedy(server.base, QUESTION, max_new_tokens=6, adapter=adapter)[0]
        assert reply.choices[0].message.content == want, name
        answers[name] = reply.choices[0].message.content
    assert len(set(answers.values())) == 3, answers


def test_sampling_settings_seed_top_p_and_stop_strings(server):
    def ask(**kwargs):
        return server.client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=12, **kwargs)

    first, again = ask(temperature=1.5, seed=7), ask(temperature=1.5, seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content, "a seed repeats the sample"
    draws = {ask(temperature=2.0, seed=s).choices[0].message.content for s in range(6)}
    assert len(draws) > 1, "sampling samples"
    greedy = ask(temperature=0).choices[0].message.content
    assert ask(temperature=1.0, top_p=1e-6, seed=3).choices[0].message.content == greedy, "top_p -> the top token"
    cut = server.client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0, stop=[" five"])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("It is", "stop")
    assert cut.usage.completion_tokens < 8
    two = server.client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0, n=2)
    assert [c.message.content for c in two.choices] == [ANSWER, ANSWER] and two.usage.completion_tokens == 16


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_errors_are_openai_shaped_with_the_right_status(server):
    client = server.client
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=49)
    assert caught.value.body["param"] == "max_tokens" and "48" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "two " * 60}])
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.body["param"] == "messages.0.role" and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=3)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert caught.value.body["code"] == "model_not_found" and "tiny-chat" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-chat", messages=QUESTION, logprobs=True)
    assert caught.value.body["param"] == "logprobs"
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="tiny-chat", prompt="x" * 5000)
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
    headers = {"Authorization": f"Bearer {KEY}"}

    def chunked():
        yield b'{"model": "tiny-chat", "prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    assert httpx.post(server.url + "/v1/completions", content=chunked(), headers=headers).status_code == 413
    broken = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    missing = httpx.get(server.url + "/v1/nothing", headers=headers)
    assert missing.status_code == 404 and "error" in missing.json()


def test_64_concurrent_requests_are_all_answered_in_batches(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    names = ["tiny-chat", "alpha", "beta"]
    want = {name: hf_greedy(server.base, QUESTION, max_new_tokens=6, adapter=server.adapters.get(name))[0]
            for name in names}
    batches_before = server.service.engine.stats["batches"]

    async def ask(i):
        name = names[i % 3]
        reply = await client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=6)
        return name, reply.choices[0].message.content, reply.usage.completion_tokens

    async def main():
        try:
            return await asyncio.gather(*(ask(i) for i in range(64)))
        finally:
            await client.close()

    replies = asyncio.run(main())
    assert len(replies) == 64
    assert all(text == want[name] for name, text, _ in replies)
    assert all(0 < n <= 6 for _, _, n in replies)
    batches = server.service.engine.stats["batches"] - batches_before
    assert batches < 64, "requests were decoded together"


def test_health_and_metrics(server):
    server.client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert re.search(r'tunesmith_requests_total\{route="/v1/chat/completions",status="200"\} [1-9]', text)
    assert re.search(r'tunesmith_requests_total\{route="/v1/models",status="401"\} [1-9]', text)
    assert re.search(r"^tunesmith_completion_tokens_total [1-9]", text, re.M)
    assert re.search(r"^tunesmith_queue_depth 0$", text, re.M)
    health = httpx.get(server.url + "/health").json()
    assert health["models"] == ["tiny-chat", "alpha", "beta"] and health["queued"] == 0


def test_serve_command_from_the_cli(server, tmp_path):
    """`python -m tunesmith serve` binds loopback, prints where, answers, and stops on SIGINT with code 0."""
    env = {**os.environ, "TUNESMITH_API_KEY": "from-env", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(server.base), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line + proc.stderr.read()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{match.group(1)}/v1", api_key="from-env", max_retries=0)
        reply = client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0)
        assert reply.choices[0].message.content == ANSWER
    finally:
        proc.send_signal(2)
        code = proc.wait(timeout=30)
    assert code == 0


def test_serve_refuses_bad_adapters_and_options(server, model_dirs, tmp_path):
    from tunesmith.errors import ConfigError
    from tunesmith.serve.server import serve_command

    with pytest.raises(ConfigError, match="NAME=PATH"):
        load_service(str(server.base), ["alpha"])
    with pytest.raises(ConfigError, match="trained on .* but the served base"):
        load_service(str(model_dirs["llama"]), [f"alpha={server.adapters['alpha']}"])
    with pytest.raises(ConfigError, match="--max-batch-size"):
        serve_command(str(server.base), max_batch_size=0)
    for option, value in (("max_queue", 0), ("request_timeout", 0.0), ("shutdown_grace", -1.0), ("threads", 0)):
        with pytest.raises(ConfigError, match="--" + option.replace("_", "-")):
            serve_command(str(server.base), **{option: value})
    from tunesmith.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--adapter-dir", "adapters", "--max-queue", "4",
                                      "--request-timeout", "2.5", "--shutdown-grace", "3", "--threads", "1"])
    assert (args.adapter_dir, args.max_queue, args.request_timeout, args.shutdown_grace, args.threads) == (
        "adapters", 4, 2.5, 3.0, 1)
    taken = server.url.rsplit(":", 1)[1]
    with pytest.raises(ConfigError, match="cannot listen"):
        serve_command(str(server.base), port=int(taken))



def test_adapter_names_and_paths_are_checked_before_anything_loads(server, tmp_path):
    """--adapter NAME=PATH: NAME is a plain name (never '..' or a path); PATH a directory holding
    adapter_config.json, or a run whose final/ does, resolved to that directory."""
    from tunesmith.errors import ConfigError
    from tunesmith.serve.adapters import configured_adapters

    alpha = Path(server.adapters["alpha"])
    for name in ("..", "../x", "a/b", "/etc", "x y", ".hidden", "-x", "né", "a" * 65, "a\nb"):
        with pytest.raises(ConfigError, match="is not allowed"):
            configured_adapters([f"{name}={alpha}"])
    (tmp_path / "file").write_text("not an adapter")
    for path, message in ((tmp_path / "missing", "not a directory"), (tmp_path / "file", "not a directory"),
                          (tmp_path, "holds no adapter_config.json")):
        with pytest.raises(ConfigError, match=message):
            configured_adapters([f"x={path}"])
    with pytest.raises(ConfigError, match="used twice"):
        configured_adapters([f"x={alpha}", f"x={alpha}"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(alpha)
    assert configured_adapters([f"a.b_c-1={run}"]) == [("a.b_c-1", alpha.resolve())]
    with pytest.raises(ConfigError, match="is not allowed"):
        load_service(str(server.base), [f"../up={alpha}"])


def test_adapter_dir_serves_each_folder_by_name_and_nothing_outside(server, tmp_path):
    """--adapter-dir DIR serves each adapter folder in DIR (a plain copy, a link that stays inside DIR) under
    its folder's name and skips folders and files that are no adapter; a folder, final/ or file that links
    outside DIR, or a folder name that is not a plain name, is refused."""
    import shutil

    from tunesmith.errors import ConfigError
    from tunesmith.serve.adapters import adapters_in

    alpha, beta = Path(server.adapters["alpha"]), Path(server.adapters["beta"])

    def adapter_dir(name: str, bad=None) -> Path:
        root = tmp_path / name
        shutil.copytree(alpha, root / "alpha")
        shutil.copytree(beta, root / ".store" / "beta")
        (root / "gamma").symlink_to(root / ".store" / "beta")  # a link that stays inside
        (root / "notes").mkdir()
        (root / "readme.txt").write_text("not an adapter")
        if bad is not None:
            bad(root)
        return root

    good = adapter_dir("good")
    assert adapters_in(str(good)) == [("alpha", good.resolve() / "alpha"),
                                      ("gamma", good.resolve() / ".store" / "beta")]

    def linked_folder(root):
        (root / "evil").symlink_to(beta)

    def linked_final(root):
        (root / "evil").mkdir()
        (root / "evil" / "final").symlink_to(beta)

    def linked_file(root):
        shutil.copytree(alpha, root / "evil")
        (root / "evil" / "adapter_model.safetensors").unlink()
        (root / "evil" / "adapter_model.safetensors").symlink_to(beta / "adapter_model.safetensors")

    def bad_name(root):
        shutil.copytree(alpha, root / "bad name")

    for bad, message in ((linked_folder, "evil reads .*, outside"), (linked_final, "evil reads .*, outside"),
                         (linked_file, "evil reads .*adapter_model.safetensors, outside"),
                         (bad_name, "'bad name' is not allowed")):
        with pytest.raises(ConfigError, match=message):
            adapters_in(str(adapter_dir(bad.__name__, bad)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no adapter folder"):
        adapters_in(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="'alpha' is used twice"):
        load_service(str(server.base), [f"alpha={alpha}"], adapter_dir=str(good))
    service = load_service(str(server.base), adapter_dir=str(good))
    try:
        assert list(service.models) == ["tiny-chat", "alpha", "gamma"]
    finally:
        service.engine.close()


def test_a_request_names_a_served_model_never_a_path(server):
    """The `model` field is looked up among the served names only: paths, '..' and near misses are 404, and
    nothing is loaded."""
    served = dict(server.service.models)
    for model in ("../alpha", str(server.adapters["alpha"]), "/etc/passwd", "alpha/../beta", "ALPHA", "alpha ", ""):
        with pytest.raises(openai.NotFoundError) as caught:
            server.client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
        assert caught.value.body["code"] == "model_not_found"
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/v1/models/..%2Falpha", headers=headers).status_code == 404
    assert server.service.models == served

def test_text_stream_holds_back_partial_characters_and_stop_strings(tokenizer):
    """Deltas joined equal the full decode; a character split over byte-level tokens is sent once complete; text
    that may begin a stop string waits, and the stop string and everything after it never appear."""
    from tunesmith.serve.generation import TextStream

    text = "Héllo wörld ✓ It is five. Then more."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len(text.split()), "some characters span several tokens"

    stream = TextStream(tokenizer, stop=["five.", "never"])
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == "Héllo wörld ✓ It is " and stream.stopped and stream.finish() == ""
    stream = TextStream(tokenizer, stop=["is fX"])  # "is f" looks like the stop's beginning, then is not
    assert "".join([stream.push(i) for i in ids] + [stream.finish()]) == text and not stream.stopped


def test_top_p_keeps_the_smallest_set_reaching_p():
    """p = (0.5, 0.3, 0.2), top_p = 0.6: the mass before token 1 is 0.5 < 0.6 (kept), before token 2 it is
    0.8 (dropped); so tokens 0 and 1 are drawn with probabilities 5/8 and 3/8, token 2 never."""
    from tunesmith.model.decode import Row, Sampling, sample

    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    row = Row([1], 1, Sampling(temperature=1.0, top_p=0.6, seed=0))
    draws = torch.tensor([sample(logits.clone(), [row]).item() for _ in range(2000)])
    assert (draws == 2).sum() == 0
    assert abs((draws == 0).float().mean().item() - 5 / 8) < 0.04
    greedy = Row([1], 1, Sampling(temperature=0.0))
    assert sample(torch.tensor([[0.1, 2.0, 0.3]]), [greedy]).tolist() == [1]


def test_missing_optional_packages_give_one_line_with_the_install_command(monkeypatch, model_dirs, tmp_path):
    import tunesmith.serve.server as server_module
    from tunesmith.errors import ConfigError
    from tunesmith.export.command import export_command

    monkeypatch.setattr(server_module, "_importable", lambda name: name != "uvicorn")
    with pytest.raises(ConfigError, match=r'needs uvicorn: pip install "tunesmith\[serve\]"'):
        server_module.serve_command("any")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ConfigError, match=r'gguf package: pip install "tunesmith\[export\]"'):
        export_command(str(model_dirs["llama"]), str(tmp_path / "m.gguf"), fmt="gguf")
