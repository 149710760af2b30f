"""DPO-LoRA step throughput and peak memory: tunesmith next to TRL's DPOTrainer, and tunesmith's DPO with
precomputed reference log-probs next to its SFT, on the same model, data, dtype and batch.

    .venv/bin/python benchmarks/dpo_bench.py --repeats 3                                  # CPU, fp32
    .venv/bin/python benchmarks/dpo_bench.py --device cuda --dtype bf16 --repeats 3       # a GPU machine

The parent builds the data, a tokenizer and a random Llama once, then runs each case in a fresh process
(`--one CASE`), so each process's memory is its own. The cases of one repeat run back to back and their order
alternates between repeats, so the drift of a shared machine hits every side alike; ratios are taken between
runs of the same repeat, and the median over repeats is reported. Cases:

    tunesmith-dpo             DPO, LoRA, the reference = the policy with its adapters off (one model in memory),
                              data.padding_free: a step's pairs in one row, each pair's prompt computed once
    tunesmith-dpo-padded      the same with padded pairs (2 x batch rows, every prompt twice)
    trl-dpo                   TRL's DPOTrainer with the same LoRA (its reference: adapters off as well)
    tunesmith-dpo-precompute  DPO with align.precompute_ref=true (reference log-probs computed before training),
                              padding-free
    tunesmith-sft-x2          SFT on the chosen conversations, 2 x batch of them: as many rows per forward as DPO
    tunesmith-sft-x1          SFT on the chosen conversations, batch of them: as many examples per step as DPO

Measured the same way on every side:
    tokens/s  non-padding tokens of the rows the model is trained on (DPO: chosen and rejected, prompts included)
              over the measured steps, divided by the wall time from the end of the last warm-up step to the end
              of the last step (data loading, the reference pass, the optimizer and logging all included)
    tokens/CPU-s  the same tokens divided by the CPU time (user + system, all threads) the process used over
              those steps: on a machine shared with other work, less disturbed by waiting for a core
    memory    CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs when training starts) minus
              the resident set at that moment, i.e. what training adds to the loaded libraries, data and model;
              CUDA: torch.cuda.max_memory_allocated minus memory_allocated at the same moment.
              On CPU, pass --mmap-threshold 65536 for memory: with glibc's default (a threshold that grows with
              the blocks freed) freed activations stay in the heap, and the same step measures anything from
              300 to 700 MB depending on what ran before; with a fixed threshold every block of 64 KiB or more
              is mapped and unmapped, so the resident set follows the live tensors (and steps get slower)
    setup     tunesmith only: the peak between building the model and the first step, above the memory after
              building it (the precomputing pass of tunesmith-dpo-precompute)
    model FLOP/s  the FLOPs the measured steps need (benchmarks/flops.py: LoRA's frozen-base forward and
              backward, causal attention per sequence, the head on the loss positions (the answer tokens), and a
              reference forward where the step has a live reference), counted on tunesmith's batches (every run
              with the same tokens in every step is credited the same FLOPs: the least any of them needs, i.e.
              each shared prompt once where a padding-free run shares them) over the same time;
              and their share of the matmul ceiling at the model's GEMM shapes, which the parent measures right
              after each case with the same number of threads (--bf16-ceiling: also the bf16 ceiling, once)
TRL reads the rows in the order tunesmith's sampler draws them, so both sides train on the same batches (the
summary checks that their per-step token counts agree).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import flops  # benchmarks/flops.py: model FLOPs and the matmul ceiling

CASES = ("tunesmith-dpo", "trl-dpo", "tunesmith-dpo-padded", "tunesmith-dpo-precompute", "tunesmith-sft-x2",
         "tunesmith-sft-x1")
LIVE_REFERENCE = ("tunesmith-dpo", "tunesmith-dpo-padded", "trl-dpo")  # a reference forward in every step
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONSONANTS = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl".split()
VOWELS = "a e i o u ai ea ou io".split()


# ---------------------------------------------------------------------------------------------------
# Data, tokenizer and model (built once by the parent)


class Words:
    """Pseudo-words with Zipf-like frequencies: a BPE vocabulary of ~16k learns whole words and pieces (~1.25
    tokens per word), so text lengths and the softmax width look like a real model's."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        syllables = [c + v for c in CONSONANTS for v in VOWELS]
        words = {"".join(self.rng.choice(syllables) for _ in range(self.rng.choice((1, 2, 2, 3, 3, 4))))
                 for _ in range(30_000)}
        self.words = sorted(words)
        self.rng.shuffle(self.words)
        self.cum_weights = list(itertools.accumulate(1 / (i + 10) for i in range(len(self.words))))

    def text(self, low: int, high: int) -> str:
        return " ".join(self.rng.choices(self.words, cum_weights=self.cum_weights, k=self.rng.randint(low, high)))


def preference_rows(n: int, words: Words) -> list[dict]:
    """Prompts and answers of 50-100 words each (~65-125 tokens)."""
    return [{"prompt": words.text(50, 100), "chosen": words.text(50, 100), "rejected": words.text(50, 100)}
            for _ in range(n)]


def prepare(work: Path, args: argparse.Namespace) -> None:
    """pairs.jsonl, and model/: the --model given, or a random Llama with its tokenizer."""
    words = Words(args.seed)
    rows = preference_rows(args.pairs, words)
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.model:
        link_model(work, args.model)
    else:
        build_random_model(work, args, words)
    print(f"{args.pairs} pairs in {work}", file=sys.stderr)


def link_model(work: Path, name: str) -> None:
    """model/ -> the model's Hugging Face directory (a packaged GGUF is converted once into tunesmith's cache)."""
    from tunesmith.model.sources import resolve_model_path

    (work / "model").symlink_to(Path(resolve_model_path(name)).resolve(), target_is_directory=True)
    shape = flops.shape_of(work / "model")
    print(f"model: {name}, {shape.params / 1e6:.1f}M parameters (vocab {shape.vocab}, hidden {shape.hidden}, "
          f"{shape.layers} layers)", file=sys.stderr)


def template_of(work: Path) -> str:
    """The built-in chat template both sides render: Gemma's turns for a Gemma model, ChatML for the others (the
    random Llama and SmolLM2 have its tokens)."""
    model_type = json.loads((work / "model" / "config.json").read_text())["model_type"]  # no model built for it
    return "gemma" if model_type.startswith("gemma") else "chatml"


def build_random_model(work: Path, args: argparse.Namespace, words: Words) -> None:
    """model/: a random Llama of the size options, with a BPE tokenizer trained on the pseudo-words."""
    from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer

    tokenizer = train_tokenizer([words.text(200, 200) for _ in range(3000)], vocab_size=args.vocab_size)
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_layers=args.layers,
                        num_heads=args.heads, intermediate_size=args.intermediate_size, max_positions=1024)
    save_tiny(work / "model", model, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: random Llama, {params / 1e6:.1f}M parameters (vocab {len(tokenizer)}, hidden "
          f"{args.hidden_size}, {args.layers} layers)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Measuring one run


class Meter:
    """Step-end times, tokens and losses of each optimizer step, and the peak memory above the memory held when
    training starts."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.times: list[float] = []
        self.cpu: list[tuple[float, float]] = []  # (user, system) seconds of the process, all threads
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.work: list[dict] = []  # flops.batch_work of each step, where the batches are tunesmith's
        self.profile: str | None = None  # torch.profiler's table of the last step (--profile)
        self.base = self.peak = self.setup_base = self.setup_peak = None

    def model_loaded(self) -> None:
        """From here to `start`: setting up training (e.g. the precomputing pass)."""
        self.setup_base = self._current()
        self._reset_peak()

    def start(self) -> None:
        if self.setup_base is not None:
            self.setup_peak = self._peak()
        self.base = self._current()
        self._reset_peak()

    def step_end(self, tokens: int, loss: float | None) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu.append(os.times()[:2])
        self.tokens.append(tokens)
        self.losses.append(loss)
        self.peak = self._peak()

    def result(self, warmup: int) -> dict:
        seconds = self.times[-1] - self.times[warmup - 1]
        measured = self.tokens[warmup:]
        steps = [b - a for a, b in zip(self.times[warmup - 1 :], self.times[warmup:])]
        user, system = (self.cpu[-1][i] - self.cpu[warmup - 1][i] for i in (0, 1))
        mb = 1 / 2**20
        return {"tokens_per_s": sum(measured) / seconds, "s_per_step": statistics.median(steps),
                "tokens_per_cpu_s": sum(measured) / (user + system), "system_share": system / (user + system),
                "step_tokens": self.tokens, "losses": self.losses, "step_work": self.work,
                "peak_mb": (self.peak - self.base) * mb, "base_mb": self.base * mb, "abs_peak_mb": self.peak * mb,
                "setup_mb": None if self.setup_peak is None else (self.setup_peak - self.setup_base) * mb,
                **({"profile": self.profile} if self.profile else {})}

    # CPU: the kernel's resident-set counters; CUDA: the caching allocator's
    def _current(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated()
        return _proc_status("VmRSS")

    def _peak(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated()
        return _proc_status("VmHWM")

    def _reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux)


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


# ---------------------------------------------------------------------------------------------------
# tunesmith


def tunesmith_config(case: str, work: Path, out: Path, args: argparse.Namespace) -> dict:
    """The `tunesmith train` config of a case (tests/test_align.py::run_config, at benchmark sizes)."""
    sft = case.startswith("tunesmith-sft")
    return {
        "model": {"name_or_path": str(work / "model"), "dtype": args.dtype},
        "data": {"train": [str(work / "pairs.jsonl")], "template": template_of(work), "max_seq_len": 1024,
                 "cache_dir": str(work / "cache"),
                 "padding_free": case in ("tunesmith-dpo", "tunesmith-dpo-precompute")},
        "strategy": {"name": "lora", "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
                                              "target_modules": LORA_TARGETS}},
        "train": {"output_dir": str(out), "objective": "sft" if sft else "dpo", "max_steps": args.steps,
                  "micro_batch_size": args.batch * (2 if case == "tunesmith-sft-x2" else 1), "lr": args.lr,
                  "seed": args.seed, "scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "probe_memory": False},  # the same 13 batches as TRL, nothing before
        "align": {"beta": args.beta, "loss_type": "sigmoid", "precompute_ref": case == "tunesmith-dpo-precompute"},
        "eval": {"batch_size": args.batch},  # the precomputing pass runs at the training batch size
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }


@contextlib.contextmanager
def metered_tunesmith(meter: Meter, count: str = "tokens", profile_step: int | None = None):
    """tunesmith has no callbacks: wrap the functions `train` calls to build the model and run a step.

    Args:
        count: the step statistic recorded as the step's tokens: "tokens" (the tokens of its examples) or "units"
            (what the loss is normalised by: the loss-bearing tokens for SFT).
        profile_step: run this step (0-based) under torch.profiler and keep its table in `meter.profile`.
    """
    from torch.profiler import profile

    import tunesmith.train.loop as loop
    import tunesmith.train.run as run

    build_model, train_step = run.build_model, loop.train_step

    def build_and_mark(*a, **kw):
        model = build_model(*a, **kw)
        resident(model)
        meter.model_loaded()
        return model

    def timed_step(model, objective, optimizer, scheduler, accelerator, micro_batches, *a, **kw):
        if meter.base is None:
            meter.start()
        profiling = len(meter.times) == profile_step
        with profile() if profiling else contextlib.nullcontext() as prof:
            stats = train_step(model, objective, optimizer, scheduler, accelerator, micro_batches, *a, **kw)
        meter.step_end(stats[count], stats["loss_sum"] / stats["units"])
        if profiling:
            meter.profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        meter.work.append(flops.batch_work(micro_batches))  # after the step's time: not counted in it
        return stats

    run.build_model, loop.train_step = build_and_mark, timed_step
    try:
        yield
    finally:
        run.build_model, loop.train_step = build_model, train_step


def last_step(args: argparse.Namespace) -> int | None:
    """The step --profile profiles: the last (its time is then not a measurement)."""
    return args.steps - 1 if args.profile else None


def run_tunesmith(case: str, work: Path, args: argparse.Namespace) -> Meter:
    from tunesmith.config import config_from_dict
    from tunesmith.train.run import train

    meter = Meter(args.device)
    with tempfile.TemporaryDirectory(dir=work) as out, metered_tunesmith(meter, profile_step=last_step(args)):
        train(config_from_dict(tunesmith_config(case, work, Path(out) / "run", args)))
    return meter


# ---------------------------------------------------------------------------------------------------
# TRL


def trl_rows(work: Path, args: argparse.Namespace) -> list[dict]:
    """The pairs as conversations, in the order tunesmith's sampler draws them (read sequentially by TRL)."""
    from tunesmith.data.batching import epoch_batches

    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    order = [i for batch in epoch_batches(len(rows), args.batch, args.seed, 0) for i in batch]
    return [{"prompt": [{"role": "user", "content": rows[i]["prompt"]}],
             "chosen": [{"role": "assistant", "content": rows[i]["chosen"]}],
             "rejected": [{"role": "assistant", "content": rows[i]["rejected"]}]} for i in order]


def trl_config(out: Path, args: argparse.Namespace):
    """DPOConfig with tunesmith's settings: no precomputing, no mixed precision or checkpointing, no truncation."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, seed=args.seed, beta=args.beta, loss_type=["sigmoid"], max_length=None,
        precompute_ref_log_probs=False, padding_free=False, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=args.device == "cpu", train_sampling_strategy="sequential", logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


def resident(model) -> None:
    """Read a value of every page of every weight. A checkpoint is loaded memory-mapped, so its pages enter the
    resident set when first read: in the first forward pass, on both sides alike (1 GB for Gemma 3 270M in fp32).
    Read before the meter starts, the weights are in the baseline, and the peak above it is what training adds."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()


def train_metered(meter: Meter, make_trainer: Callable[[list], object], count: Callable[[dict], int]) -> Meter:
    """Train the TRL trainer `make_trainer(callbacks)` builds, recording each optimizer step in `meter`: its tokens
    are `count(inputs)` summed over the step's micro-batches, its loss the one TRL logs."""
    from transformers import TrainerCallback

    pending: list[int] = []

    class Steps(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            resident(kw["model"])
            meter.start()

        def on_step_end(self, *a, **kw):
            meter.step_end(sum(pending), None)
            pending.clear()

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.losses[-1] = logs["loss"]

    trainer = make_trainer([Steps()])
    step = trainer.training_step

    def counted_step(model, inputs, *a, **kw):
        pending.append(count(inputs))
        return step(model, inputs, *a, **kw)

    trainer.training_step = counted_step
    trainer.train()
    return meter


def run_trl(work: Path, args: argparse.Namespace) -> Meter:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from tunesmith.data.templates import install_template
    from tunesmith.model.load import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    install_template(tokenizer, template_of(work))  # the template tunesmith renders
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=DTYPES[args.dtype])
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(dir=work) as out:
        return train_metered(
            Meter(args.device),
            lambda callbacks: DPOTrainer(model=model, args=trl_config(Path(out), args), processing_class=tokenizer,
                                         train_dataset=Dataset.from_list(trl_rows(work, args)), peft_config=lora,
                                         callbacks=callbacks),
            lambda inputs: int(inputs["attention_mask"].sum()))


# ---------------------------------------------------------------------------------------------------
# Driver


def run_one(case: str, work: Path, args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    meter = run_trl(work, args) if case == "trl-dpo" else run_tunesmith(case, work, args)
    return {"case": case, "threads": torch.get_num_threads(), **meter.result(args.warmup)}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spawn(case: str, work: Path, args: argparse.Namespace, script: str = __file__,
          shared: tuple[str, ...] | None = None) -> dict:
    """One case in a fresh process (`script --one CASE`, given the options named in `shared`, default SHARED);
    the 1/5/15-minute load averages before and after it."""
    shared = SHARED if shared is None else shared
    options = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
               if k in shared and v is not None and v is not False]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.mmap_threshold:  # glibc: fixed threshold, so large blocks go back to the system when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    before = loadavg()
    out = subprocess.run([sys.executable, script, "--one", case, "--workdir", str(work), *options],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{case} failed:\n{out.stderr[-4000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_before": before, "load_after": loadavg()}


def summarise(runs: list[dict], args: argparse.Namespace) -> str:
    """Markdown: the median of each case, then the within-repeat ratios."""
    by_case = {c: [r for r in runs if r["case"] == c] for c in args.cases}
    lines = ["| case | tokens/s | s/step | tokens/CPU-s | peak memory above start (MB) | baseline (MB) | "
             f"setup peak (MB) | tokens/step | loss step 1 -> last | {flops.LIMIT_HEADER}", "|---" * 12 + "|"]
    for case, rs in by_case.items():
        if not rs:
            continue
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        setup = [r["setup_mb"] for r in rs if r["setup_mb"] is not None]
        losses = rs[0]["losses"]
        lines.append(f"| {case} | {med('tokens_per_s'):.0f} | {med('s_per_step'):.2f} | "
                     f"{med('tokens_per_cpu_s'):.0f} | {med('peak_mb'):.0f} | "
                     f"{med('base_mb'):.0f} | {f'{statistics.median(setup):.0f}' if setup else '-'} | "
                     f"{statistics.mean(rs[0]['step_tokens']):.0f} | {losses[0]:.4f} -> {losses[-1]:.4f} | "
                     + flops.limit_cells(rs))
    lines += ["", "| ratio (median over repeats, each within one repeat) | per repeat | median |", "|---|---|---|"]
    for label, num, den, key in RATIOS:
        if by_case.get(num) and by_case.get(den):
            pairs = [(a[key], b[key]) for a, b in zip(by_case[num], by_case[den])]
            values = [a / b for a, b in pairs]
            lines.append(f"| {label} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |")
    if by_case.get("tunesmith-dpo") and by_case.get("trl-dpo"):
        same = all(a["step_tokens"] == b["step_tokens"] for a, b in zip(by_case["tunesmith-dpo"], by_case["trl-dpo"]))
        lines += ["", f"Same tokens in every step on both sides: {'yes' if same else 'NO'}"]
    return "\n".join(lines)


RATIOS = (
    ("tokens/s, tunesmith DPO / TRL DPO", "tunesmith-dpo", "trl-dpo", "tokens_per_s"),
    ("tokens/CPU-s, tunesmith DPO / TRL DPO", "tunesmith-dpo", "trl-dpo", "tokens_per_cpu_s"),
    ("peak memory, tunesmith DPO / TRL DPO", "tunesmith-dpo", "trl-dpo", "peak_mb"),
    ("tokens/s, tunesmith DPO padded / TRL DPO", "tunesmith-dpo-padded", "trl-dpo", "tokens_per_s"),
    ("peak memory, tunesmith DPO padded / TRL DPO", "tunesmith-dpo-padded", "trl-dpo", "peak_mb"),
    ("tokens/s, tunesmith DPO / tunesmith DPO padded", "tunesmith-dpo", "tunesmith-dpo-padded", "tokens_per_s"),
    ("peak memory, DPO precomputed / SFT x2", "tunesmith-dpo-precompute", "tunesmith-sft-x2", "peak_mb"),
    ("peak memory, DPO precomputed / SFT x1", "tunesmith-dpo-precompute", "tunesmith-sft-x1", "peak_mb"),
    ("peak memory, DPO live reference / DPO precomputed", "tunesmith-dpo", "tunesmith-dpo-precompute", "peak_mb"),
)
# Options every case process receives from the parent.
SHARED = ("device", "dtype", "threads", "pairs", "vocab_size", "hidden_size", "layers", "heads", "intermediate_size",
          "batch", "steps", "warmup", "lr", "beta", "lora_r", "lora_alpha", "seed", "profile")


def add_common_arguments(p: argparse.ArgumentParser, cases: tuple[str, ...]) -> None:
    """The options every side-by-side benchmark takes: cases, repeats, device and threads, model and step sizes."""
    p.add_argument("--cases", nargs="+", choices=cases, default=list(cases))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, help="torch threads in each run (default: torch's choice)")
    p.add_argument("--mmap-threshold", type=int,
                   help="CPU: run the cases with MALLOC_MMAP_THRESHOLD_ set to this many bytes (see dpo_bench.py)")
    p.add_argument("--model", help="a real model instead of the random Llama: a path or a packaged name "
                   "(smollm2-135m-instruct, gemma3-270m), as model.name_or_path takes it; the size options are then "
                   "ignored")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the data and model here (default: a temporary directory)")
    p.add_argument("--json", help="also write every run's measurements to this file")
    p.add_argument("--bf16-ceiling", action="store_true",
                   help="also measure the bf16 matmul ceiling once (slow on a CPU that emulates bf16)")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's table of the last step of each tunesmith case (that step is then "
                   "slower: not a run to quote)")
    p.add_argument("--one", choices=cases, help=argparse.SUPPRESS)  # internal: run one case in this process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, CASES)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step (2 x batch rows)")
    p.add_argument("--beta", type=float, default=0.1)
    return p.parse_args(argv)


def run_repeats(args: argparse.Namespace, run_case: Callable[[str], dict],
                limit: Callable[[dict, list[dict]], dict] | None = None) -> list[dict]:
    """Every case `args.repeats` times, in an order that alternates between repeats; one line per run. `limit`
    (run, runs so far) -> fields added to the run, called right after it (the model FLOP/s and the ceiling)."""
    runs = []
    for repeat in range(args.repeats):
        for case in args.cases if repeat % 2 == 0 else args.cases[::-1]:
            runs.append({**run_case(case), "repeat": repeat})
            r = runs[-1]
            r.update(limit(r, runs) if limit else {})
            share = f", {r['share_of_ceiling']:.0%} of the matmul ceiling" if "share_of_ceiling" in r else ""
            print(f"repeat {repeat} {case}: {r['tokens_per_s']:.0f} tokens/s{share}, {r['peak_mb']:.0f} MB above "
                  f"start, load {r['load_before']} -> {r['load_after']}", file=sys.stderr, flush=True)
            if r.get("profile"):
                print(r.pop("profile"), file=sys.stderr, flush=True)
    return runs


def step_work(run: dict, runs: list[dict]) -> list[dict] | None:
    """The flops.batch_work of each step of `run`: of all runs with the same tokens in every step (TRL trains on
    tunesmith's batches), the work of the one that needs the least (a padding-free DPO run computes each shared
    prompt once); None when there is none yet."""
    same = [r["step_work"] for r in [run, *runs] if r.get("step_work") and r["step_tokens"] == run["step_tokens"]]
    return min(same, key=lambda work: sum(step["tokens"] for step in work)) if same else None


def limiter(args: argparse.Namespace, shape, strategy_of: Callable[[str], str],
            lora_targets: list[str]) -> Callable[[dict, list[dict]], dict]:
    """run_repeats' `limit`: the run's model FLOP/s and its share of the ceiling, measured in this process now."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the ceiling on as many threads as the cases

    def limit(run: dict, runs: list[dict]) -> dict:
        work = step_work(run, runs)
        if work is None:
            return {}
        return flops.run_limit(run, work, args.warmup, shape, strategy_of(run["case"]), args.dtype, args.device,
                               lora_r=args.lora_r, lora_targets=tuple(lora_targets),
                               reference=run["case"] in LIVE_REFERENCE)
    return limit


def ceilings(runs: list[dict], shape, args: argparse.Namespace) -> str:
    """flops.ceilings_line at the mean step of the first run with batches (empty without --bf16-ceiling)."""
    work = next((r["step_work"] for r in runs if r.get("step_work")), None)
    if not args.bf16_ceiling or work is None:
        return ""
    mean = lambda key: round(statistics.mean(w[key] for w in work))  # noqa: E731
    return "\n" + flops.ceilings_line(shape, mean("positions"), mean("loss_positions"), args.device)


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.workdir), args)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").exists():
        prepare(work, args)
    shape = flops.shape_of(work / "model")
    limit = limiter(args, shape, lambda _: "lora", LORA_TARGETS)
    runs = run_repeats(args, lambda case: spawn(case, work, args), limit)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(summarise(runs, args) + ceilings(runs, shape, args))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
