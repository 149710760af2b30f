"""ReFT: low-rank interventions on hidden representations of a frozen model (LoReFT).

Wu et al. 2024, "ReFT: Representation Finetuning for Language Models" (arXiv:2404.03592). At chosen blocks, the
block's output h (the residual stream, (d,)) at chosen prompt positions is replaced by

    Phi(h) = h + R^T (W h + b - R h)        R (r, d) with orthonormal rows; W (r, d), b (r,)

so the part of h inside the r-dimensional subspace spanned by R's rows is swapped for W h + b, and the rest of h
is left alone. R stays orthonormal through `torch.nn.utils.parametrizations.orthogonal` (Householder
reflectors, no d x d buffer), so the trained parameters are exactly 2 r d + r per layer.

Positions: the first `first` and the last `last` tokens of each row's prompt (one intervention per layer serves
both). Which tokens are the prompt depends on the pass:

    training    the tokens before a row's first supervised label: `intervening_on_prompts` wraps an objective
                so that its forward passes see the positions its batch's labels give
    scoring     a labelled batch outside training (eval loss, an option's log-likelihood) likewise, inside
                `positions_as_trained(model, batch)`
    a new pass  (no KV cache yet: a prompt being encoded, a classification batch) every real token
                (attention_mask, left or right padded) is prompt
    decoding    a pass that continues a KV cache carries generated tokens: nothing is intervened on

so a generated continuation sees exactly the representations a full forward pass over prompt + continuation
would give with the interventions on the prompt positions only.

The base model's weights never change; `save_pretrained` writes the intervention parameters (plus any trained
task head) and a small JSON config, and `load_reft` puts them back on a base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.errors import ConfigError, DataError
from tunesmith.model.blocks import transformer_blocks

FORMAT = "tunesmith-reft/1"
CONFIG_FILE = "reft_config.json"
WEIGHTS_FILE = "reft_interventions.safetensors"


@dataclass(frozen=True)
class ReftSpec:
    """Where and how big the interventions are (plain values, from `strategy.reft`)."""

    layers: str | Sequence[int] = "all"  # "all" or block indices (negative: from the end)
    rank: int = 4
    first: int = 3
    last: int = 3
    dropout: float = 0.0


class LoReFT(nn.Module):
    """Phi(h) = h + R^T (W h + b - R h) on the last dimension of h; parameters in float32."""

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0 < rank <= hidden_size:
            raise ConfigError(f"strategy.reft.rank: must be between 1 and the hidden size {hidden_size}, got {rank}")
        # R is the weight of a bias-free (d -> r) linear map, kept with orthonormal rows.
        self.rotate = orthogonal(nn.Linear(hidden_size, rank, bias=False, dtype=torch.float32),
                                 orthogonal_map="householder", use_trivialization=False)
        self.source = nn.Linear(hidden_size, rank, dtype=torch.float32)  # W h + b
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        rotation = self.rotate.weight  # (r, d)
        x = h.to(rotation.dtype)
        edit = self.source(x) - x @ rotation.T  # (..., r): W h + b - R h
        return h + (self.dropout(edit) @ rotation).to(h.dtype)


def prompt_positions(attention_mask: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """(B, T) bool: the first `first` and last `last` real tokens of each row (left or right padding).

    Args:
        attention_mask: (B, T), 1 on the prompt's real tokens.
    """
    real = attention_mask.bool()
    rank = real.long().cumsum(-1) - 1  # (B, T): index of each real token among its row's real tokens
    length = real.sum(-1, keepdim=True)  # (B, 1)
    return real & ((rank < first) | (rank >= length - last))


def prompt_mask_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: the real tokens before each row's first supervised label (all of them if it has none).

    Raises:
        DataError when a row is supervised from its first token, so it has no prompt to intervene on.
    """
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    supervised = (labels != IGNORE_INDEX) & real
    prompt = real & (supervised.long().cumsum(-1) == 0)
    empty = supervised.any(-1) & ~prompt.any(-1)
    if empty.any():
        raise DataError("ReFT intervenes on prompt tokens, but a row is supervised from its first token (plain "
                        "text, or data.train_on_prompt=true); train ReFT on prompt/answer data with the prompt "
                        "masked")
    return prompt


class ReftModel(nn.Module):
    """A frozen model with LoReFT interventions on the outputs of some of its blocks.

    Calls (`forward`, `generate`) and attributes (`config`, `device` ...) go to the wrapped model, like a
    PEFT model's. Hooks on the model do the work, so `model.model.generate(...)` intervenes the same way.
    """

    def __init__(self, model: nn.Module, spec: ReftSpec = ReftSpec()) -> None:
        super().__init__()
        if spec.first < 0 or spec.last < 0 or spec.first + spec.last == 0:
            raise ConfigError("strategy.reft.first / last: intervene on at least one prompt position "
                              f"(got first={spec.first}, last={spec.last})")
        blocks = transformer_blocks(model)
        self.model = model
        self.spec = dataclasses.replace(spec, layers=resolve_layers(spec.layers, len(blocks)))
        hidden = model.config.get_text_config().hidden_size
        self.interventions = nn.ModuleDict({str(i): LoReFT(hidden, spec.rank, spec.dropout) for i in self.spec.layers})
        self._positions: torch.Tensor | None = None  # (B, T) bool, for the pass under way
        self._given: torch.Tensor | None = None  # set by `positions`: overrides the default rule
        model.register_forward_pre_hook(self._choose_positions, with_kwargs=True)
        for i in self.spec.layers:
            blocks[i].register_forward_hook(functools.partial(self._intervene, self.interventions[str(i)]))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @contextlib.contextmanager
    def positions(self, mask: torch.Tensor) -> Iterator[None]:
        """Intervene at `mask` (B, T) bool in every forward pass inside the block (training: the prompt
        positions that the labels give)."""
        outer, self._given = self._given, mask
        try:
            yield
        finally:
            self._given = outer

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The base model alone inside the block (named as PEFT's, so the preference objectives find it)."""
        with self.positions(torch.zeros(0, dtype=torch.bool)):  # an empty mask: no position anywhere
            yield

    def _choose_positions(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = (ids if ids is not None else embeds).shape[:2]
        cache = kwargs.get("cache")  # transformers >= 5.25 names the KV cache `cache`
        if self._given is not None:
            self._positions = self._given if self._given.numel() else None
            if self._positions is not None and tuple(self._positions.shape) != tuple(shape):
                raise ValueError(f"ReFT positions of shape {tuple(self._positions.shape)} for inputs {tuple(shape)}")
        elif cache is not None and cache.get_seq_length() > 0:
            self._positions = None  # decoding: these are generated tokens
        else:
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(shape, dtype=torch.long, device=(ids if ids is not None else embeds).device)
            self._positions = prompt_positions(mask[:, -shape[1]:], self.spec.first, self.spec.last)

    def _intervene(self, intervention: LoReFT, module, args, output):
        if self._positions is None or not self._positions.any():
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        edited = hidden.clone()
        edited[self._positions] = intervention(hidden[self._positions])  # (N, d) at the N chosen positions
        return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited

    # --- saving -----------------------------------------------------------------------------------------

    def trained_base_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters of the wrapped model that train too (a new classification head), by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_pretrained(self, path: str | Path, **_: object) -> None:
        """`reft_config.json` and `reft_interventions.safetensors` (interventions + trained head) in `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"interventions.{k}": v for k, v in self.interventions.state_dict().items()}
        tensors.update({f"model.{k}": v for k, v in self.trained_base_parameters().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path / WEIGHTS_FILE)
        config = {"format": FORMAT, "base_model_name_or_path": getattr(self.model, "name_or_path", None),
                  **dataclasses.asdict(self.spec), "layers": list(self.spec.layers),
                  "hidden_size": self.model.config.get_text_config().hidden_size,
                  "trained_base_parameters": sorted(self.trained_base_parameters())}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def resolve_layers(layers: str | Sequence[int], num_blocks: int) -> tuple[int, ...]:
    """Block indices, sorted and non-negative, from "all" or a list (negative counts from the end)."""
    if isinstance(layers, str):
        if layers != "all":
            raise ConfigError(f"strategy.reft.layers: 'all' or a list of block indices, got {layers!r}")
        return tuple(range(num_blocks))
    if not layers:
        raise ConfigError("strategy.reft.layers: empty; name at least one block")
    out = set()
    for i in layers:
        if not -num_blocks <= i < num_blocks:
            raise ConfigError(f"strategy.reft.layers: block {i} does not exist (the model has {num_blocks})")
        out.add(i % num_blocks)
    return tuple(sorted(out))


def apply_reft(model: nn.Module, spec: ReftSpec, train_modules: Sequence[str] = ()) -> ReftModel:
    """Freeze `model`, wrap it with trainable interventions; `train_modules` (a new head) train as well."""
    model.requires_grad_(False)
    for name in train_modules:
        model.get_submodule(name).requires_grad_(True)
    return ReftModel(model, spec)


def is_reft_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_reft(model: nn.Module, path: str | Path) -> ReftModel:
    """The base `model` with the interventions (and trained head weights) saved in `path`, in eval mode."""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{path / CONFIG_FILE}: not a tunesmith ReFT directory (format {config.get('format')!r})")
    if model.config.get_text_config().hidden_size != config["hidden_size"]:
        raise ConfigError(f"{path}: interventions for hidden size {config['hidden_size']}, but the base model has "
                          f"{model.config.get_text_config().hidden_size}; load the base it was trained on "
                          f"({config['base_model_name_or_path']})")
    spec = ReftSpec(tuple(config["layers"]), config["rank"], config["first"], config["last"], config["dropout"])
    reft = apply_reft(model, spec, train_modules=())
    tensors = load_file(path / WEIGHTS_FILE)
    reft.interventions.load_state_dict(_under(tensors, "interventions."))
    head = _under(tensors, "model.")
    missing = set(config["trained_base_parameters"]) - set(head)
    if missing:
        raise ConfigError(f"{path / WEIGHTS_FILE}: lacks {sorted(missing)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in head.items():
            params[name].copy_(value)
    return reft.eval()


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def intervening_on_prompts(objective):
    """`objective` (an `Objective`) whose forward passes intervene on the prompt positions its batch's labels
    give (or, for batches without token labels, on the real tokens of the attention mask)."""

    def loss(model, batch):
        reft = getattr(model, "module", model)  # under DDP the ReftModel is wrapped
        return _with_positions(reft, batch, objective.loss, model)

    return dataclasses.replace(objective, loss=loss)


def _with_positions(reft: ReftModel, batch: dict[str, torch.Tensor], fn, model):
    with reft.positions(batch_positions(reft, batch)):
        return fn(model, batch)


def batch_positions(reft: ReftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) bool: where a batch is intervened on, as training does it: the first and last positions of each
    row's prompt (the tokens before its first label), or of its real tokens when the batch has no token labels."""
    if "position_ids" in batch and "attention_mask" not in batch:
        raise ConfigError("data.pack: ReFT intervenes on each row's prompt; packed rows hold several, so set "
                          "data.pack=false")
    mask = batch.get("attention_mask")
    if "labels" in batch:
        prompt = prompt_mask_from_labels(batch["labels"], mask)
    else:
        prompt = mask if mask is not None else torch.ones_like(batch["input_ids"])
    return prompt_positions(prompt, reft.spec.first, reft.spec.last)


def positions_as_trained(model: nn.Module, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """A context in which `model`, if it is a ReftModel, intervenes on `batch` where training did
    (`batch_positions`): scoring a labelled batch (eval loss, an option's log-likelihood) then gives the numbers
    training and generation give. Any other model: nothing changes.

        with positions_as_trained(model, batch):
            logits = model(**model_inputs(batch)).logits
    """
    if not isinstance(model, ReftModel):
        return contextlib.nullcontext()
    return model.positions(batch_positions(model, batch))
