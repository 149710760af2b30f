"""ORPO: supervised NLL on the chosen completion plus an odds-ratio preference term, no reference model.

Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
(arXiv:2403.07691). With length-averaged log-probabilities a_c, a_r of the chosen and rejected completions
(p = exp(a) is the per-token geometric-mean probability), odds(p) = p / (1 - p) and

    log_odds = log odds(p_c) - log odds(p_r) = (a_c - a_r) - (log(1 - e^{a_c}) - log(1 - e^{a_r}))
    loss     = nll_c - lambda * log sigma(log_odds)

Normalisation: the paper's L_SFT is a token-mean NLL. Here each pair contributes the token-mean NLL of its own
chosen completion (its summed NLL divided by its token count), so a pair's loss depends on that pair only:
the loop sums pair losses and divides by the number of pairs in the accumulation window, which makes
accumulation exact. (A batch-wide token mean, as TRL computes it, weights long completions more and cannot be
split across micro-batches by pairs.) The paper uses lambda = 0.1 (0.2 to 1.0 in some settings).

log(1 - e^a) is computed as log(-expm1(a)) near 0 and log1p(-e^a) below -ln 2 (Maechler 2012, "Accurately
computing log(1 - exp(-|a|))"), with a capped at -1e-6: a completion whose every token has probability 1 in
float32 would otherwise give log(0) and a NaN gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_AVG_LOGP = -1e-6  # keeps log(1 - e^a) finite (about -13.8) when a rounds to 0


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate near 0 and far below it; a is capped at MAX_AVG_LOGP."""
    a = a.clamp(max=MAX_AVG_LOGP)
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_losses(
    chosen_nll_sum: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss.

    Args:
        chosen_nll_sum: (B,) summed NLL of the chosen completion's supervised tokens (-`sequence_logps`[0]).
        chosen_num_tokens: (B,) how many tokens that sum covers (a pair with 0 contributes no NLL).
        chosen_avg_logps, rejected_avg_logps: (B,) length-averaged log-probabilities of the completions
            (<= 0; usually -chosen_nll_sum / chosen_num_tokens for the chosen one).
        lam: weight of the odds-ratio term.
    Returns:
        (losses (B,), nll (B,) token-mean NLL of the chosen completion, log_odds (B,)); the last two detached.
    """
    nll = chosen_nll_sum / chosen_num_tokens.clamp(min=1)  # (B,)
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    losses = nll - lam * F.logsigmoid(log_odds)
    return losses, nll.detach(), log_odds.detach()
