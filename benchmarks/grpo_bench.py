"""GRPO's update pass on padded rows and on padding-free rows with each prompt computed once (`data.padding_free`).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/grpo_bench.py --threads 1 --repeats 3

What the layout changes is the update: the policy's forward and backward over a step's G samples per prompt (and
the reference pass, a forward over the same rows). Sampling is the same on both sides and is left out. The rows
are SmolLM2-135M-Instruct's (the packaged model, or `--model`; fp32, LoRA r 16 on every linear): `--prompts` prompts of
`--prompt-tokens` random tokens (a long system prompt and question, as RL prompts often are), each with
`--group` completions of 16 to `--max-new` tokens, rewards drawn at random. Each repeat times one update of each
layout in the same process, in alternating order; the table gives the medians and the losses, which must agree.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def rollouts(vocab: int, prompts: int, group: int, prompt_tokens: int, max_new: int, seed: int) -> list:
    from tunesmith.data.tokenize import IGNORE_INDEX, Example

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(prompts):
        prompt = torch.randint(5, vocab, (prompt_tokens,), generator=generator).tolist()
        for _ in range(group):
            n = int(torch.randint(16, max_new + 1, (1,), generator=generator))
            completion = torch.randint(5, vocab, (n,), generator=generator).tolist()
            rows.append(Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return rows


def update(objective, model, batch: dict) -> tuple[float, float]:
    """Seconds of one reference pass and one loss + backward, and the loss."""
    start = time.perf_counter()
    with torch.no_grad():
        batch = {**batch, "ref_token_logps": objective.reference_token_logps(model, batch)}
    out = objective.loss(model, batch)
    out.loss_sum.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(out.loss_sum.detach())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a packaged model's name or a directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--max-new", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.batching import collate
    from tunesmith.model.attention import VARLEN
    from tunesmith.model.sources import resolve_model_path
    from tunesmith.model.strategies import apply_strategy
    from tunesmith.objectives.rl import GRPO, Rollout, collate_groups, group_advantages

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    padded_model = apply_strategy(base, "lora", lora_r=16, lora_alpha=32, target_modules="auto").train()
    flat_model = copy.deepcopy(padded_model)
    flat_model.get_base_model().set_attn_implementation(VARLEN)
    rows = rollouts(len(tokenizer), args.prompts, args.group, args.prompt_tokens, args.max_new, seed=0)
    rewards = torch.rand(len(rows), generator=torch.Generator().manual_seed(1))
    extra = {"rewards": rewards, "advantages": group_advantages(rewards, args.group),
             "completion_tokens": torch.tensor([sum(t != -100 for t in r.labels) for r in rows])}
    layouts = {"padded": (padded_model, {**collate(rows, tokenizer.pad_token_id), **extra}),
               "padding-free, shared prompts": (flat_model, {**collate_groups(rows, args.group, True), **extra})}
    objective = GRPO(tokenizer, Rollout(group_size=args.group), [], beta=0.04)
    tokens = sum(len(r.input_ids) for r in rows)
    print(f"{len(rows)} samples ({args.prompts} prompts x {args.group}), {tokens} tokens; "
          f"positions: padded {layouts['padded'][1]['input_ids'].numel()}, "
          f"padding-free {layouts['padding-free, shared prompts'][1]['input_ids'].numel()}; {args.threads} thread(s)")
    update(objective, *layouts["padded"])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in layouts}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name in (list(layouts) if repeat % 2 == 0 else list(layouts)[::-1]):
            seconds, losses[name] = update(objective, *layouts[name])
            times[name].append(seconds)
    print("\n| layout | positions | s per update (reference + loss + backward) | tokens/s | loss |")
    print("|---|---|---|---|---|")
    for name, (_, batch) in layouts.items():
        median = statistics.median(times[name])
        print(f"| {name} | {batch['input_ids'].numel():,} | {median:.2f} ({', '.join(f'{t:.2f}' for t in times[name])})"
              f" | {tokens / median:.0f} | {losses[name]:.6f} |")
    ratios = [a / b for a, b in zip(times["padded"], times["padding-free, shared prompts"])]
    print(f"\nspeed-up per repeat: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
    return losses


if __name__ == "__main__":
    main()
