"""Continuous batching (`tunesmith.model.decode`, `tunesmith.model.kv_cache`) and the serve engine on it: rows of
different prompt lengths that join a running batch at different steps, and leave it at different steps, decode
token for token what each decodes alone -- the oracle is Hugging Face `generate` on the prompt alone. Sampled
rows repeat per seed whoever shares their batch; cancellation, stop tokens and max_new_tokens hold; the engine
lets a request join at the next step and runs one group per adapter; `tunesmith eval` generation decodes the same
way and gives what `generate` gave.

The models are tiny (2 layers, width 32), random and float64, so that "the same tokens" is exact: float32 rounding
differs between batch shapes and could flip a near tie.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tunesmith.model import kv_cache
from tunesmith.model.decode import Batch, Row, Sampling, decode
from tunesmith.serve.engine import Engine, Job

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
LENGTHS = (3, 11, 7, 25, 1, 40)  # prompt lengths; the 40 joins last, longer than any running row
JOIN_AT = {0: [0], 2: [1, 2], 5: [3], 9: [4], 12: [5]}  # step -> the rows that join before it
MAX_NEW = (9, 20, 4, 14, 30, 11)  # so rows also leave at different steps


def tiny(family: str = "llama", seed: int = 0, **extra):
    """A random float64 causal LM: 2 layers, width 32, 4 query and 2 key/value heads; it never stops by itself."""
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=1, eos_token_id=2)
    else:
        config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    model.generation_config.eos_token_id = None
    return model


def prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def alone(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers' greedy `generate` on the prompt by itself (no padding, no other row)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def staggered(batch: Batch, rows: list[Row], join_at: dict[int, list[int]], steps: int = 200):
    """Drive `batch`: before step k the rows of join_at[k] join; returns each row's (tokens, reasons)."""
    tokens, reasons = {i: [] for i in range(len(rows))}, {i: [] for i in range(len(rows))}
    index = {id(row): i for i, row in enumerate(rows)}
    for step in range(steps):
        events = batch.add([rows[i] for i in join_at.get(step, [])]) + batch.step()
        for row, token, reason in events:
            tokens[index[id(row)]].append(token)
            reasons[index[id(row)]].append(reason)
        if not batch and step > max(join_at):
            break
    return tokens, reasons


SLIDING = {"sliding_window": 6}
FAMILIES = {
    "llama": {}, "qwen2": {}, "gpt2": {},
    "mistral": SLIDING,  # every layer attends to the last 6 positions only
    "gemma3_text": {**SLIDING, "head_dim": 8, "layer_types": ["sliding_attention", "full_attention"]},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_joining_and_leaving_at_different_steps_decode_as_alone(family, monkeypatch):
    """Six prompts of 1 to 40 tokens join at steps 0, 2, 5, 9 and 12 and leave after 4 to 30 tokens: every row's
    greedy tokens equal `generate` on its prompt alone, and each ends with "length" at its max_new_tokens. On the
    way the cache is re-laid out: the running rows move right for a longer joining prompt, the columns that only
    the 40-token row used are dropped once it has left, slots double; leaving rows move the last row into
    their slot."""
    monkeypatch.setattr(kv_cache, "GROWTH", 4)
    relayout, shifts = kv_cache.RowLayer.relayout, []

    def recorded(layer, rows, columns, live, lo, end, shift):
        shifts.append(shift)
        relayout(layer, rows, columns, live, lo, end, shift)

    monkeypatch.setattr(kv_cache.RowLayer, "relayout", recorded)
    model = tiny(family, **FAMILIES[family])
    rows = [Row(p, n) for p, n in zip(prompts(), MAX_NEW)]
    tokens, reasons = staggered(Batch(model, [], pad_id=0), rows, JOIN_AT)
    for i, (prompt, n) in enumerate(zip(prompts(), MAX_NEW)):
        assert tokens[i] == alone(model, prompt, n), f"row {i}"
        assert reasons[i] == [None] * (n - 1) + ["length"]
    assert any(shift > 0 for shift in shifts) and any(shift < 0 for shift in shifts), shifts


def test_a_sliding_window_changes_the_answer_so_the_test_above_checks_it():
    """The windowed models of the test above answer differently with the window off: the masks mattered."""
    windowed, full = tiny("mistral", **SLIDING), tiny("mistral")
    prompt = prompts()[3]
    assert alone(windowed, prompt, 8) != alone(full, prompt, 8)


def test_sampled_rows_repeat_per_seed_whoever_shares_their_batch():
    """Each row draws from its own generator: with seeds, a row's samples are the same alone as in a staggered
    batch with other sampled and greedy rows; a different seed gives other samples."""
    model = tiny()

    def make(seed_offset: int = 0) -> list[Row]:
        return [Row(p, 12, Sampling(temperature=0.0 if i == 2 else 1.3, top_p=0.95, seed=10 + i + seed_offset))
                for i, p in enumerate(prompts())]

    together, _ = staggered(Batch(model, [], 0), make(), JOIN_AT)
    for i, row in enumerate(make()):
        by_itself = [token for step in decode(model, [row], [], 0) for _, token, _ in step]
        assert together[i] == by_itself, f"row {i}"
    other, _ = staggered(Batch(model, [], 0), make(seed_offset=100), JOIN_AT)
    assert other[0] != together[0] and other[2] == together[2]  # row 2 is greedy


def test_cancelled_rows_leave_and_stop_tokens_end_a_row():
    """A row cancelled after its 3rd token gets no further event; a row whose 5th greedy token is made a stop
    token ends there with "stop" (the event carries it); the others still decode as alone."""
    model = tiny()
    ps = prompts()
    stop = alone(model, ps[1], 5)[4]
    assert stop not in alone(model, ps[1], 5)[:4]
    rows = [Row(p, 16) for p in ps]
    seen: dict[int, list] = {i: [] for i in range(len(rows))}
    for step in decode(model, rows, [stop], pad_id=0, max_rows=4):
        for i, token, reason in step:
            seen[i].append((token, reason))
            if i == 0 and len(seen[0]) == 3:
                rows[0].cancelled = True
    assert len(seen[0]) == 3 and all(reason is None for _, reason in seen[0])
    assert seen[1][-1] == (stop, "stop") and len(seen[1]) == 5
    for i in range(2, len(rows)):
        want = alone(model, ps[i], 16)
        cut = want.index(stop) + 1 if stop in want else 16
        assert [t for t, _ in seen[i]] == want[:cut], f"row {i}"


# ----------------------------------------------------------------------------------------------- the engine


class Recorder:
    """Collects the events of several jobs in the order the engine sent them; `done` once all have ended."""

    def __init__(self, count: int):
        self.events: list[tuple[int, tuple]] = []
        self.remaining = count
        self.done = threading.Event()
        self.hooks: dict[tuple[int, int], callable] = {}  # (job, tokens so far) -> called then

    def callback(self, index: int):
        def on_event(event: tuple) -> None:
            self.events.append((index, event))
            hook = self.hooks.pop((index, len(self.tokens(index))), None)
            if hook is not None:
                hook()
            if event[0] == "error" or event[2] is not None:
                self.remaining -= 1
                if self.remaining == 0:
                    self.done.set()
        return on_event

    def tokens(self, index: int) -> list[int]:
        return [e[1] for i, e in self.events if i == index and e[0] == "token"]

    def first_event(self, index: int) -> int:
        return next(k for k, (i, _) in enumerate(self.events) if i == index)


def test_a_request_joins_the_running_batch_at_the_next_step():
    """Job B is submitted from job A's 3rd token event: B's first token comes right after A's 3rd, before A's
    4th (it did not wait for A to finish), and both answer what each answers alone."""
    model = tiny()
    pa, pb = prompts()[3], prompts()[1]
    engine = Engine(model, [], pad_id=0, max_batch_size=4).start()
    try:
        record = Recorder(2)
        b = Job(pb, 10, Sampling(), None, record.callback(1))
        record.hooks[(0, 3)] = lambda: engine.submit([b])
        engine.submit([Job(pa, 12, Sampling(), None, record.callback(0))])
        assert record.done.wait(60)
    finally:
        engine.close()
    assert record.tokens(0) == alone(model, pa, 12) and record.tokens(1) == alone(model, pb, 10)
    a_tokens = [k for k, (i, e) in enumerate(record.events) if i == 0]
    assert a_tokens[2] < record.first_event(1) < a_tokens[3]
    stats = engine.stats
    assert stats["batches"] == 2 and stats["step_rows"] > stats["steps"], stats
    assert stats["jobs_finished"] == 2 and stats["running"] == 0 and stats["tokens_generated"] == 22


def lora_model():
    """The tiny Llama under two random LoRA adapters, "a0" and "a1" (non-zero B: each changes the answers)."""
    from peft import LoraConfig, get_peft_model

    def config(rank: int) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)

    torch.manual_seed(5)
    model = get_peft_model(tiny(), config(4), adapter_name="a0")
    model.add_adapter("a1", config(2))
    return model.double().eval()


def alone_with(model, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    if adapter is None:
        with model.disable_adapter():
            return alone(model, prompt, n)
    model.set_adapter(adapter)
    return alone(model, prompt, n)


def test_each_adapter_group_decodes_as_alone_and_no_group_waits_for_another():
    """Jobs on "a0", "a1" and the base arrive together, and another "a0" job joins from the 2nd token of the
    first: each answers what its adapter answers alone (peft + generate), and the groups take turns step by
    step -- every job's first token comes before any job's last."""
    model = lora_model()
    ps = prompts()
    plan = [("a0", ps[0], 8), ("a1", ps[1], 8), (None, ps[2], 8), ("a0", ps[3], 6)]
    want = [alone_with(model, adapter, p, n) for adapter, p, n in plan]
    assert len({tuple(w) for w in want[:3]}) == 3, "the adapters change the answers"
    engine = Engine(model, [], pad_id=0, max_batch_size=8).start()
    try:
        record = Recorder(len(plan))
        jobs = [Job(p, n, Sampling(), adapter, record.callback(i)) for i, (adapter, p, n) in enumerate(plan)]
        record.hooks[(0, 2)] = lambda: engine.submit([jobs[3]])
        engine.submit(jobs[:3])
        assert record.done.wait(60)
    finally:
        engine.close()
    assert [record.tokens(i) for i in range(len(plan))] == want
    last = min(max(k for k, (i, _) in enumerate(record.events) if i == j) for j in range(len(plan)))
    assert max(record.first_event(j) for j in range(len(plan))) < last


def test_engine_cancellation_and_max_new_tokens():
    """Of two jobs, the one cancelled at its 2nd token gets nothing more and leaves the batch; the other ends
    with "length" at exactly max_new_tokens; the engine counts both as finished."""
    model = tiny()
    engine = Engine(model, [], pad_id=0, max_batch_size=4).start()
    try:
        record = Recorder(1)
        jobs = [Job(p, n, Sampling(), None, record.callback(i)) for i, (p, n) in enumerate(zip(prompts()[:2],
                                                                                             (30, 7)))]
        record.hooks[(0, 2)] = jobs[0].cancel
        engine.submit(jobs)
        assert record.done.wait(60)
    finally:
        assert engine.close()
    assert len(record.tokens(0)) == 2
    assert [e for i, e in record.events if i == 1][-1][2] == "length" and len(record.tokens(1)) == 7
    assert engine.stats["jobs_finished"] == 2 and engine.stats["running"] == 0


# ------------------------------------------------------------------------------------------- eval generation


def test_eval_generation_gives_what_generate_gave(monkeypatch):
    """`generate_token_ids` (continuous batching, 2 rows at a time over 6 prompts) equals the batched
    transformers `generate` it replaced (left-padded batches of 2, cut at the first stop token)."""
    from tunesmith.data.batching import left_pad
    from tunesmith.eval.generate import generate_token_ids

    model = tiny()
    ps = prompts()
    stop = alone(model, ps[1], 4)[3]
    model.generation_config.eos_token_id = stop
    want = []
    for start in range(0, len(ps), 2):
        input_ids, attention_mask = left_pad(ps[start:start + 2], 0)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10,
                             do_sample=False, eos_token_id=[stop], pad_token_id=0)[:, input_ids.shape[1]:]
        want += [row[:row.index(stop)] if stop in row else row for row in out.tolist()]
    assert generate_token_ids(model, ps, 0, max_new_tokens=10, batch_size=2) == want
    assert len(want[1]) == 3


def test_eval_generation_of_a_prompt_tuning_model_goes_through_peft():
    """A prompt-tuning adapter puts virtual tokens before the prompt: its answers are PEFT `generate`'s."""
    from peft import PromptTuningConfig, get_peft_model

    from tunesmith.eval.generate import generate_token_ids

    base = tiny()
    base.generation_config.eos_token_id = 2
    model = get_peft_model(tiny(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).double().eval()
    model.generation_config.eos_token_id = 2
    ps = prompts()[:3]
    got = generate_token_ids(model, ps, 0, max_new_tokens=5, batch_size=3)
    for p, answer in zip(ps, got):
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=[2],
                             pad_token_id=0)[0, len(p):].tolist()
        assert answer == (out[:out.index(2)] if 2 in out else out)
    assert generate_token_ids(base, ps, 0, max_new_tokens=5, batch_size=3) != got, "the soft prompt counted"


def test_serve_bench_client_keeps_c_requests_in_flight_and_measures_them():
    """benchmarks/serve_bench.py's client on a tiny model: every request answered in full, never more than C in
    flight, the in-flight window inside the whole run, and the summary's ratio to one request at a time."""
    import argparse

    from conftest import load_benchmark

    bench = load_benchmark("serve_bench")
    model = tiny()
    engine = Engine(model, [], pad_id=0, max_batch_size=4).start()
    try:
        runs = [{**bench.Client(engine, prompts(), level, 5).run(), "repeat": 0, "load": (0.0, 0.0)}
                for level in (1, 3)]
    finally:
        engine.close()
    for run in runs:
        assert [len(a) for a in run["answers"]] == [5] * len(LENGTHS)
        assert run["answers"] == [alone(model, p, 5) for p in prompts()]
        window, whole = run["in_flight"], run["all"]
        assert 0 < window["tokens"] < whole["tokens"] == 5 * len(LENGTHS) and window["seconds"] <= whole["seconds"]
    assert runs[0]["in_flight"]["mean_batch"] == 1.0 and 1.0 < runs[1]["in_flight"]["mean_batch"] <= 3.0
    table = bench.summarise(runs, argparse.Namespace(threads=1, max_new_tokens=5, repeats=1, levels=[1, 3]))
    assert "| 3 | 6 |" in table and "6/6 |" in table
