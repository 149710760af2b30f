"""A config's Plan: the batch it trains on (from data.max_seq_len, or the prepared data's longest micro-batch), the
strategy, the dtypes and the objective's extra passes."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.config.objectives import OBJECTIVES
from tunesmith.errors import ConfigError
from tunesmith.hardware import cuda_available
from tunesmith.model.targets import ADAPTER_STRATEGIES, DEFAULT_TARGET_MODULES
from tunesmith.train.estimate.plan import Plan
from tunesmith.train.estimate.shape import ModelShape

SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning", "reft")  # estimated as frozen weights (strategy "prompt")


def plan_from_config(cfg: Config, shape: ModelShape, batch: dict | None = None,
                     device: str | None = None) -> tuple[Plan, list[str]]:
    """The Plan of a config (and notes on what is approximated); `batch` is `cached_batch`'s answer or None;
    `device`: "cpu" or "cuda", where training will run (None: CUDA when this machine has it, as accelerate picks)."""
    t, st, a = cfg.train, cfg.strategy, cfg.align
    spec = OBJECTIVES[t.objective]
    if st.name == "features":
        raise ConfigError("strategy.name: features trains no weights in the loop; there is no step to estimate")
    dims, notes = batch_dims(cfg, batch)
    notes += strategy_notes(st.name)
    reference = spec.needs_reference(a.kl_beta) and not a.precompute_ref and st.name not in ADAPTER_STRATEGIES
    quant = 0.5 + (1 / 64 + 4 / (64 * 256) if st.quant.double_quant else 4 / 64)  # NF4 + absmax per 64 weights
    adapters = st.name in ADAPTER_STRATEGIES
    device = device or ("cuda" if cuda_available() else "cpu")
    plan = Plan(
        **dims, weight_bytes=weight_bytes_of(cfg.model.dtype, device), amp=t.mixed_precision != "no",
        strategy=st.name if st.name in ("full", "freeze", "lora", "dora", "qlora", "head") else "prompt",
        lora_r=st.lora.r, lora_targets=lora_targets(cfg, shape) if adapters else (),
        lora_dropout=st.lora.dropout if adapters else 0.0, quant_bytes=quant,
        freeze_layers=st.freeze.last_n_layers if st.name == "freeze" else 0,
        head_trains=st.name == "head" or (st.name == "freeze" and "lm_head" in st.freeze.modules),
        gradient_checkpointing=t.gradient_checkpointing, grad_accum=t.grad_accum, reference_copy=reference,
        reference_pass=spec.precomputable_reference and not a.precompute_ref,
        vocab_logits=spec.head == "causal",
        fused_loss=st.name not in SOFT_PROMPTS and (t.fused_loss and spec.next_token_loss or head_on_targets(cfg)),
        eval_rows=cfg.eval.batch_size * dims["rows"] // t.micro_batch_size
        if cfg.data.validation or cfg.data.split.validation else 0,
        device=device,
    )
    return plan, notes


def weight_bytes_of(dtype: str, device: str) -> int:
    """Bytes per weight of model.dtype on `device`; "auto" is bf16 on a CUDA device that supports it, else fp32
    (model/load.py's resolve_dtype)."""
    if dtype == "auto":
        if device != "cuda":
            return 4
        import torch

        return 2 if torch.cuda.is_bf16_supported() else 4
    return {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


def batch_dims(cfg: Config, batch: dict | None) -> tuple[dict, list[str]]:
    """The Plan's batch fields (rows, seq_len, loss_rows, mask, source, logit_positions) and notes."""
    t, d, notes = cfg.train, cfg.data, []
    spec = OBJECTIVES[t.objective]
    rows = t.micro_batch_size * spec.rows_per_example
    seq_len = d.max_seq_len
    # Packed and padding-free rows run attention per example (no mask) under SDPA
    varlen = (d.pack or d.padding_free) and cfg.model.attn_implementation == "sdpa"
    loss_rows, mask, source = rows * (seq_len - 1), (d.pack or rows > 1) and not varlen, "data.max_seq_len"
    flat = d.padding_free and spec.padding_free
    if flat:  # one row of every example of the micro-batch
        rows, seq_len = 1, rows * seq_len
    logit_positions = 0
    if spec.generates:
        samples, seq_len = t.micro_batch_size * cfg.align.group_size, d.max_seq_len + cfg.align.max_new_tokens
        rows, loss_rows = samples, samples * cfg.align.max_new_tokens
        if flat:  # the samples end to end: an upper bound (a group's prompt is computed once)
            rows, seq_len = 1, samples * seq_len
        notes.append("RL: the update is estimated; sampling (its KV cache) is not")
    elif batch is not None:
        seq_len, loss_rows, source = batch["seq_len"], batch["loss_rows"], "prepared data"
        mask = batch["mask"] and not varlen
        if flat:  # a pair's two conversations end to end: an upper bound (a shared prompt is computed once)
            seq_len = batch["flat_len" if spec.next_token_loss else "flat_pairs_len"]
        # The loss objectives ask for logits from the batch's first answer token on (`answer_logits`); prompt
        # and prefix tuning prepend virtual tokens and ReFT wraps the model, so they keep every position.
        if cfg.strategy.name not in SOFT_PROMPTS:
            logit_positions = seq_len - batch["prompt_floor"]
    return dict(rows=rows, seq_len=seq_len, loss_rows=loss_rows, mask=mask, source=source,
                logit_positions=logit_positions), notes


def head_on_targets(cfg: Config) -> bool:
    """Objectives whose log-probs come from the head on the supervised positions only, chunk by chunk, like the
    fused loss, whatever train.fused_loss says: padding-free pairs and GRPO's update (objectives/rl.py)."""
    return flat_pairs(cfg) or OBJECTIVES[cfg.train.objective].grouped


def flat_pairs(cfg: Config) -> bool:
    """Padding-free pairs (objectives/pairs.py): their log-probs come from the head on the answer positions only,
    chunk by chunk, like the fused loss, whatever train.fused_loss says."""
    spec = OBJECTIVES[cfg.train.objective]
    return cfg.data.padding_free and spec.data == "preference" and spec.padding_free


def lora_targets(cfg: Config, shape: ModelShape) -> tuple[str, ...]:
    """The block linears strategy.lora.target_modules adapts ("auto": the architecture's default)."""
    targets = cfg.strategy.lora.target_modules
    if targets == "auto":
        targets = DEFAULT_TARGET_MODULES.get(shape.model_type, "all-linear")
    return tuple(shape.block_linears) if targets == "all-linear" else tuple(targets)


def strategy_notes(name: str) -> list[str]:
    """What the estimate leaves out for this strategy."""
    if name in ("head",) + SOFT_PROMPTS:
        return [f"strategy {name}: estimated as frozen weights (its own few parameters not counted)"]
    return []


def cached_batch(cfg: Config, tokenizer) -> dict | None:
    """The longest micro-batch of the training data when it is already prepared (in the cache): its padded
    length, an upper bound of its loss positions (the B largest counts of each side), whether it is padded, and
    the fewest prompt positions any batch can skip (the shortest prompt of the data, so that the logits' length
    is an upper bound)."""
    from tunesmith.data.build import cache_dir, clean_from_config, options_from_config, sources_from_config
    from tunesmith.data.pipeline import fingerprint

    key = fingerprint(tokenizer, sources_from_config(cfg), options_from_config(cfg), clean_from_config(cfg))
    path = cache_dir(cfg) / key / "train"
    if not path.is_dir():
        return None
    from tunesmith.data.arrow import read_table

    return longest_batch(read_table(path), cfg.train.micro_batch_size)


def longest_batch(table, b: int) -> dict:
    """`cached_batch`'s answer from a prepared pyarrow table and the micro-batch size `b`."""
    import numpy as np
    import pyarrow.compute as pc

    sides = [("input_ids", "labels")] + ([("rejected_ids", "rejected_labels")]
                                         if "rejected_ids" in table.column_names else [])
    lengths, losses, floors = [], [], []
    for ids, labels in sides:
        column = table.column(labels).combine_chunks()
        lengths.append(pc.list_value_length(table.column(ids)).fill_null(0).to_numpy(zero_copy_only=False))
        values = column.flatten().to_numpy(zero_copy_only=False)
        starts = column.offsets.to_numpy()[:-1]
        counted = np.add.reduceat(values != -100, starts) if len(values) else np.zeros(len(starts))
        first = values[np.minimum(starts, len(values) - 1)] != -100  # label 0 is never a target after the shift
        losses.append(np.sort(counted - first)[::-1][:b].sum())
        supervised = np.flatnonzero(values != -100)  # the first supervised position of each row, minus one
        if len(supervised):
            rows_seen, first_index = np.unique(np.searchsorted(starts, supervised, side="right") - 1,
                                               return_index=True)
            floors.append(int(max((supervised[first_index] - starts[rows_seen]).min() - 1, 0)))
    top = np.sort(np.concatenate(lengths))[::-1][: b * len(sides)]
    seq_len = int(top[0])
    packed = "position_ids" in table.column_names and table.column("position_ids").null_count < len(table)
    return {"seq_len": seq_len, "loss_rows": int(min(len(top) * (seq_len - 1), sum(losses))),
            "flat_len": int(np.sort(lengths[0])[::-1][:b].sum()),  # padding-free: the b longest end to end
            "flat_pairs_len": int(top.sum()),  # padding-free pairs: the 2b longest conversations
            "mask": bool(packed or (top != seq_len).any()), "prompt_floor": 0 if packed or not floors else min(floors)}
