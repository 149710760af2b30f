"""What each training objective needs, declared once.

Config checks, data preparation, model building, the training run, the memory estimate, evaluation and
compare-strategies all ask `OBJECTIVES[name]` what an objective needs instead of comparing its name. The losses
themselves live in `tunesmith.objectives` (`build_objective`); this table is plain data, low in the ladder, so
that every layer can read it.

Adding an objective: a row here, its loss and builder in `tunesmith.objectives`, its tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective trains on and what a run must build for it.

    Attributes:
        data: the rows it trains on: "text" (a raw corpus), "chat" (conversations), "preference" (prompt,
            chosen, rejected), "unpaired" (prompt, completion, desirable), "prompts" (prompts with optional
            reference answers; completions are sampled) or "labelled" (text + label).
        head: what the model outputs: "causal" (next-token logits), "score" (one number per sequence, a new
            head) or "classification" (class logits, a new head).
        reference: "none", "always" (a frozen reference model's log-probs) or "kl" (only when align.kl_beta > 0).
        precomputable_reference: `align.precompute_ref` can compute the reference log-probs once, before training,
            instead of keeping a reference model.
        generates: it samples completions while training (RL), which sharded weights cannot follow.
        next_token_loss: its loss is the next-token NLL of the unmasked labels, so the fused loss, packing and
            padding-free batches apply (padding-free batches also to pairs: `padding_free`).
        grouped: it samples groups of completions of one prompt and reads their log-probs from the head on the
            completion positions (GRPO): padding-free rollouts apply, each group's prompt computed once.
    """

    data: str
    head: str = "causal"
    reference: str = "none"
    precomputable_reference: bool = False
    generates: bool = False
    next_token_loss: bool = False
    grouped: bool = False

    @property
    def chat_template(self) -> bool:
        """Rows are rendered with a chat template (`data.template`); raw text and labelled text are not."""
        return self.data not in ("text", "labelled")

    @property
    def padding_free(self) -> bool:
        """`data.padding_free` applies: the next-token objectives, the pair objectives that read the policy's
        log-probs of both answers (a pair's prompt is then computed once: objectives/pairs.py), and GRPO's groups."""
        return self.next_token_loss or (self.data == "preference" and self.head == "causal") or self.grouped

    @property
    def stops_at_end_of_turn(self) -> bool:
        """The tuned model writes assistant turns, so generation stops at the template's end-of-turn token."""
        return self.chat_template and self.head == "causal"

    @property
    def rows_per_example(self) -> int:
        """Sequences the model reads per training example (a preference pair is two)."""
        return 2 if self.data == "preference" else 1

    @property
    def samples_generations(self) -> bool:
        """`eval.generate_samples` applies: its validation rows are prompts with reference answers."""
        return self.data in ("chat", "prompts", "labelled")

    @property
    def compared_with_base(self) -> bool:
        """A language model whose general abilities can be compared with its base's (the forgetting guard)."""
        return self.head == "causal"

    def needs_reference(self, kl_beta: float) -> bool:
        """Whether the reference model's log-probs are needed, given `align.kl_beta`."""
        return self.reference == "always" or (self.reference == "kl" and kl_beta > 0)


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec("chat", next_token_loss=True),
    "clm": ObjectiveSpec("text", next_token_loss=True),
    "reward": ObjectiveSpec("preference", head="score"),
    "dpo": ObjectiveSpec("preference", reference="always", precomputable_reference=True),
    "simpo": ObjectiveSpec("preference"),
    "orpo": ObjectiveSpec("preference"),
    "kto": ObjectiveSpec("unpaired", reference="always", precomputable_reference=True),
    "grpo": ObjectiveSpec("prompts", reference="kl", generates=True, grouped=True),
    "ppo": ObjectiveSpec("prompts", reference="always", generates=True),
    "classify": ObjectiveSpec("labelled", head="classification"),
}


def objectives_where(**wanted) -> tuple[str, ...]:
    """The names of the objectives whose spec has every attribute given, e.g. `objectives_where(data="preference")`."""
    return tuple(n for n, s in OBJECTIVES.items() if all(getattr(s, k) == v for k, v in wanted.items()))
