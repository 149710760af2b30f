"""SFT step throughput and peak memory, LoRA and full fine-tuning: tunesmith next to TRL's SFTTrainer, on the same
model, data, dtype and batches.

    .venv/bin/pip install trl   # the benchmark's TRL side only; tunesmith does not depend on it
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sft_bench.py --repeats 3 --threads 1     # CPU, fp32
    .venv/bin/python benchmarks/sft_bench.py --device cuda --dtype bf16 --repeats 3       # a GPU machine (not run yet)
    .venv/bin/python benchmarks/sft_bench.py --model smollm2-135m-instruct --threads 2    # a real model's weights

Runs the way benchmarks/dpo_bench.py does, with its measuring code: the parent builds the data, a tokenizer and a
random Llama once (or links the real model of `--model`, its own tokenizer and tunesmith's template for it), then runs each case in a fresh process (`--one CASE`); the cases of one repeat run back to
back, their order alternating between repeats; ratios are taken between runs of the same repeat and the median
over repeats is reported. Cases:

    tunesmith-lora     tunesmith SFT, LoRA on every linear layer, padding-free batches (data.padding_free: the same
                       batches laid end to end, attention per conversation) and its fused loss (the default)
    tunesmith-lora-padded   the same on padded batches (tunesmith's default data layout)
    trl-lora-default   TRL's SFTTrainer with the same LoRA and its default data path: padded batches, no packing
    trl-lora-best      the same with padding_free=True: each batch is one row of its examples end to end, with
                       position ids restarting at each (transformers builds the block-diagonal mask for SDPA)
    tunesmith-full, tunesmith-full-padded, trl-full-default, trl-full-best   the same four with every weight trained
    tunesmith-qlora, trl-qlora-best   LoRA on the base loaded in 4 bit by bitsandbytes on both sides (NF4, double
                       quantisation, --dtype compute), padding-free; TRL prepares the 4-bit model as tunesmith does
                       (peft's prepare_model_for_kbit_training)

Both sides train on the same tokens: each assistant reply and its end-of-turn token (tunesmith's SFT labels).
TRL's default for conversations is a loss on every token; its `assistant_only_loss=True` restricts it to the
assistant turns, marked by `{% generation %}` in the chat template: TRL_CHATML below, which renders exactly
what tunesmith's chatml renders (tests/test_sft_bench.py checks the ids and labels agree). TRL reads the
conversations in the order tunesmith's sampler draws them, so every step trains on the same examples (the
summary checks the per-step counts of loss tokens agree). Packing is left out on both sides: it regroups the
examples, so the steps would no longer see the same tokens.

Settings of SFTConfig set to tunesmith's (TRL's own default in brackets): fp32 weights and math, bf16=False
[True]; gradient_checkpointing=False [True] unless `--checkpointing on` (then on both sides, each with its own
default way of recomputing); learning rate, linear schedule without warm-up, no weight decay,
clipping at 1.0, AdamW (fused, both sides) as given; a log every step [10].

Measured the same way on every side (dpo_bench.Meter):
    tokens/s  loss-bearing tokens (assistant tokens, never padding) of the measured steps, divided by the wall
              time from the end of the last warm-up step to the end of the last step
    tokens/CPU-s  the same tokens over the CPU time the process used over those steps
    memory    CPU: peak resident set (VmHWM, reset through /proc/self/clear_refs when training starts) minus the
              resident set at that moment, every weight read once before it (dpo_bench.resident: the memory-mapped
              checkpoint's pages are then in the baseline on both sides); CUDA: max_memory_allocated minus
              memory_allocated then
    model FLOP/s  the FLOPs the measured steps need (benchmarks/flops.py: 6N per token for full fine-tuning, 4N
              with LoRA's frozen base plus the adapters, causal attention per conversation, the head on the
              loss tokens), the same for every case (the same batches), over the same time; and their share of
              the matmul ceiling at the model's GEMM shapes, measured by the parent right after each case
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
import dpo_bench as dpo  # noqa: E402  its data, model, measuring and driver code
import flops  # noqa: E402  model FLOPs and the matmul ceiling

CASES = ("tunesmith-lora", "tunesmith-lora-padded", "trl-lora-default", "trl-lora-best",
         "tunesmith-full", "tunesmith-full-padded", "trl-full-default", "trl-full-best",
         "tunesmith-qlora", "trl-qlora-best")
# tunesmith's chatml (tunesmith.data.templates.CHATML) with each reply and its end-of-turn token marked as the
# assistant's: the text is the same, the marks only tell `return_assistant_tokens_mask` where replies are.
TRL_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# tunesmith's gemma (tunesmith.data.templates.GEMMA), marked the same way; its system message is folded into the
# first user turn.
TRL_GEMMA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<end_of_turn>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') + message['content']"
    " + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
TRL_TEMPLATES = {"chatml": TRL_CHATML, "gemma": TRL_GEMMA}


# ---------------------------------------------------------------------------------------------------
# Data (built once by the parent; the tokenizer and model are dpo_bench's)


def _length(words: dpo.Words, median: float, sigma: float, low: int, high: int) -> int:
    """A log-normal word count clipped to [low, high]: most turns short, a long tail."""
    return max(low, min(high, round(words.rng.lognormvariate(0, sigma) * median)))


def conversation(words: dpo.Words, max_words: int) -> dict:
    """A chat of 1-3 exchanges (30% with a system prompt): questions of ~25 words, answers of ~70 (medians),
    each with a long tail; redrawn until it has at most `max_words` words."""
    rng = words.rng
    while True:
        messages = [{"role": "system", "content": words.text(5, 30)}] if rng.random() < 0.3 else []
        for _ in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
            question, answer = _length(words, 25, 1.0, 3, 250), _length(words, 70, 0.9, 3, 450)
            messages += [{"role": "user", "content": words.text(question, question)},
                         {"role": "assistant", "content": words.text(answer, answer)}]
        if sum(len(m["content"].split()) for m in messages) <= max_words:
            return {"messages": messages}


def prepare(work: Path, args: argparse.Namespace) -> None:
    """chats.jsonl, and model/: the --model given, or a random Llama with its tokenizer."""
    words = dpo.Words(args.seed)
    rows = [conversation(words, args.max_words) for _ in range(args.conversations)]
    (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.model:
        dpo.link_model(work, args.model)
    else:
        dpo.build_random_model(work, args, words)
    print(f"{args.conversations} conversations in {work}", file=sys.stderr)


def trl_rows(work: Path, args: argparse.Namespace) -> list[dict]:
    """The conversations in the order tunesmith's sampler draws them in the first epoch (TRL reads them in order)."""
    from tunesmith.data.batching import epoch_batches

    rows = [json.loads(line) for line in (work / "chats.jsonl").read_text().splitlines()]
    if args.steps * args.batch > len(rows):
        raise ValueError(f"{args.steps} steps of {args.batch} need {args.steps * args.batch} conversations in one "
                         f"epoch, there are {len(rows)}: raise --conversations")
    return [rows[i] for batch in epoch_batches(len(rows), args.batch, args.seed, 0) for i in batch]


def trl_tokenizer(work: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    tokenizer.chat_template = trl_template(tokenizer, dpo.template_of(work))
    return tokenizer


def trl_template(tokenizer, name: str) -> str:
    """tunesmith's built-in template `name` with the replies marked for TRL, beginning with the BOS where
    tunesmith's does (`templates.install_template`)."""
    from tunesmith.data.templates import BOS_WHEN_ENCODED, adds_bos

    bos = name in BOS_WHEN_ENCODED and adds_bos(tokenizer)
    return ("{{- bos_token -}}" if bos else "") + TRL_TEMPLATES[name]


def trl_encodings(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Token ids and assistant masks of each conversation, as SFTTrainer's `assistant_only_loss` gets them."""
    out = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True) for r in rows]
    return [(o["input_ids"], o["assistant_masks"]) for o in out]


def step_shapes(encodings: list[tuple[list[int], list[int]]], batch: int, steps: int) -> list[dict]:
    """Per step: loss tokens (labels after the first position), tokens, and positions of the padded batch."""
    shapes = []
    for start in range(0, steps * batch, batch):
        rows = encodings[start : start + batch]
        shapes.append({"loss_tokens": sum(sum(mask[1:]) for _, mask in rows),
                       "tokens": sum(len(ids) for ids, _ in rows),
                       "padded": len(rows) * max(len(ids) for ids, _ in rows)})
    return shapes


# ---------------------------------------------------------------------------------------------------
# tunesmith


def tunesmith_config(case: str, work: Path, out: Path, args: argparse.Namespace) -> dict:
    """The `tunesmith train` config of a case: SFT with tunesmith's defaults, at the benchmark's sizes."""
    return {
        "model": {"name_or_path": str(work / "model"), "dtype": args.dtype},
        "data": {"train": [str(work / "chats.jsonl")], "template": dpo.template_of(work), "max_seq_len": 1024,
                 "cache_dir": str(work / "cache"), "padding_free": not case.endswith("-padded")},
        "strategy": {"name": strategy_of(case), "quant": {"compute_dtype": args.dtype},
                     "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
                              "target_modules": dpo.LORA_TARGETS}},
        "train": {"output_dir": str(out), "objective": "sft", "max_steps": args.steps,
                  "micro_batch_size": args.batch, "lr": args.lr, "seed": args.seed, "scheduler": "linear",
                  "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "probe_memory": False,  # the same batches as TRL, nothing before them
                  "gradient_checkpointing": args.checkpointing == "on"},
        "tracking": {"progress_bar": False, "log_level": "warning"},
    }


def strategy_of(case: str) -> str:
    return "full" if "-full" in case else "qlora" if "-qlora" in case else "lora"


def run_tunesmith(case: str, work: Path, args: argparse.Namespace):
    from tunesmith.config import config_from_dict
    from tunesmith.train.run import train

    meter = dpo.Meter(args.device)
    metered = dpo.metered_tunesmith(meter, count="units", profile_step=dpo.last_step(args))
    with tempfile.TemporaryDirectory(dir=work) as out, metered:
        train(config_from_dict(tunesmith_config(case, work, Path(out) / "run", args)))
    return meter


# ---------------------------------------------------------------------------------------------------
# TRL


def trl_config(case: str, out: Path, args: argparse.Namespace):
    """SFTConfig: TRL's defaults for the data (padded, unpacked; its default max_length of 1024 truncates none
    of the conversations) or padding_free for `-best`; assistant-only loss; the training settings above."""
    from trl import SFTConfig

    best = case.endswith("-best")
    return SFTConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, seed=args.seed, assistant_only_loss=True, padding_free=best,
        **({"max_length": None} if best else {}),  # padding_free does not truncate: TRL asks for None
        gradient_checkpointing=args.checkpointing == "on", bf16=False, fp16=False, use_cpu=args.device == "cpu",
        train_sampling_strategy="sequential", logging_steps=1, report_to="none", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


def run_trl(case: str, work: Path, args: argparse.Namespace):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from tunesmith.model.load import DTYPES

    quant = None
    if strategy_of(case) == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=DTYPES[args.dtype])
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=DTYPES[args.dtype], quantization_config=quant)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=dpo.LORA_TARGETS, task_type="CAUSAL_LM") if "lora-" in case else None
    with tempfile.TemporaryDirectory(dir=work) as out:
        return dpo.train_metered(
            dpo.Meter(args.device),
            lambda callbacks: SFTTrainer(model=model, args=trl_config(case, Path(out), args),
                                         processing_class=trl_tokenizer(work),
                                         train_dataset=Dataset.from_list(trl_rows(work, args)), peft_config=lora,
                                         callbacks=callbacks),
            lambda inputs: int((inputs["labels"][:, 1:] != -100).sum()))  # as tunesmith counts its loss tokens


# ---------------------------------------------------------------------------------------------------
# Driver


def run_one(case: str, work: Path, args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    meter = run_trl(case, work, args) if case.startswith("trl-") else run_tunesmith(case, work, args)
    return {"case": case, "threads": torch.get_num_threads(), **meter.result(args.warmup)}


def data_summary(work: Path, args: argparse.Namespace) -> str:
    """The conversations' token lengths and what a step holds: loss tokens, tokens, padded positions."""
    from tunesmith.data.tokenize import length_stats

    encodings = trl_encodings(trl_tokenizer(work), trl_rows(work, args))
    lengths = length_stats([len(ids) for ids, _ in encodings])
    steps = step_shapes(encodings, args.batch, args.steps)
    mean = lambda key: statistics.mean(s[key] for s in steps)  # noqa: E731
    return (f"Conversations: {len(encodings)}, tokens min {lengths['min']} / p50 {lengths['p50']} / p90 "
            f"{lengths['p90']} / max {lengths['max']} (mean {lengths['mean']}). Per step ({args.batch} "
            f"conversations, mean of {args.steps}): {mean('loss_tokens'):.0f} loss tokens, {mean('tokens'):.0f} "
            f"tokens, {mean('padded'):.0f} positions when padded ({1 - mean('tokens') / mean('padded'):.0%} padding).")


def summarise(runs: list[dict], args: argparse.Namespace) -> str:
    """Markdown: the median of each case, the within-repeat ratios, and whether every side saw the same tokens."""
    by_case = {c: [r for r in runs if r["case"] == c] for c in args.cases}
    lines = ["| case | tokens/s | s/step | tokens/CPU-s | peak memory above start (MB) | baseline (MB) | "
             f"loss tokens/step | loss step 1 -> last | {flops.LIMIT_HEADER}", "|---" * 11 + "|"]
    for case, rs in by_case.items():
        if not rs:
            continue
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        losses = rs[0]["losses"]
        lines.append(f"| {case} | {med('tokens_per_s'):.0f} | {med('s_per_step'):.2f} | "
                     f"{med('tokens_per_cpu_s'):.0f} | {med('peak_mb'):.0f} | {med('base_mb'):.0f} | "
                     f"{statistics.mean(rs[0]['step_tokens']):.0f} | {losses[0]:.4f} -> {losses[-1]:.4f} | "
                     + flops.limit_cells(rs))
    lines += ["", "| ratio (median over repeats, each within one repeat) | per repeat | median |", "|---|---|---|"]
    for label, num, den, key in RATIOS:
        if by_case.get(num) and by_case.get(den):
            values = [a[key] / b[key] for a, b in zip(by_case[num], by_case[den])]
            lines.append(f"| {label} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |")
    if len(runs) > 1:
        same = len({tuple(r["step_tokens"]) for r in runs}) == 1
        lines += ["", f"Same loss tokens in every step of every run: {'yes' if same else 'NO'}"]
    return "\n".join(lines)


RATIOS = tuple(
    (f"{what}, tunesmith {kind} / TRL {kind} {trl}", f"tunesmith-{kind}", f"trl-{kind}-{trl}", key)
    for kind in ("lora", "full", "qlora")
    for what, key in (("tokens/s", "tokens_per_s"), ("tokens/CPU-s", "tokens_per_cpu_s"), ("peak memory", "peak_mb"))
    for trl in ("default", "best")
)
# Options every case process receives from the parent.
SHARED = ("device", "dtype", "threads", "conversations", "max_words", "vocab_size", "hidden_size", "layers", "heads",
          "intermediate_size", "batch", "steps", "warmup", "lr", "lora_r", "lora_alpha", "seed", "checkpointing",
          "profile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dpo.add_common_arguments(p, CASES)
    p.add_argument("--conversations", type=int, default=128)
    p.add_argument("--max-words", type=int, default=650, help="words per conversation at most (~1.25 tokens each)")
    p.add_argument("--batch", type=int, default=4, help="conversations per step")
    p.add_argument("--checkpointing", choices=("off", "on"), default="off",
                   help="gradient checkpointing on both sides (TRL's default is on)")
    return p.parse_args(argv)


def main() -> None:
    import shutil

    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.workdir), args)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").exists():
        prepare(work, args)
    shape = flops.shape_of(work / "model")
    limit = dpo.limiter(args, shape, lambda case: "full" if "-full" in case else "lora", dpo.LORA_TARGETS)
    runs = dpo.run_repeats(args, lambda case: dpo.spawn(case, work, args, script=__file__, shared=SHARED), limit)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(data_summary(work, args) + "\n")
    print(summarise(runs, args) + dpo.ceilings(runs, shape, args))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
