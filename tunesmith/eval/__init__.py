"""Evaluation building blocks: greedy generation through the chat template, and answer metrics."""

from tunesmith.eval.generate import complete_greedy, generate_greedy, greedy_token_ids, prompt_ids
from tunesmith.eval.metrics import exact_match, exact_match_rate, normalize_answer

__all__ = ["complete_greedy", "exact_match", "exact_match_rate", "generate_greedy", "greedy_token_ids",
           "normalize_answer", "prompt_ids"]
