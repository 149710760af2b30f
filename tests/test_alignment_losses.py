"""Alignment objectives as pure tensor functions, each checked against arithmetic written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.objectives.dpo import DPO_LOSSES, dpo_losses
from tunesmith.objectives.grpo import group_advantages, grpo_losses
from tunesmith.objectives.kto import kto_losses, kto_reference_point
from tunesmith.objectives.orpo import log1mexp, orpo_losses
from tunesmith.objectives.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_losses,
    clipped_value_losses,
    gae,
    kl_penalty,
    shaped_rewards,
    whiten,
)
from tunesmith.objectives.reward import bradley_terry_losses
from tunesmith.objectives.simpo import simpo_losses
from tunesmith.objectives.tokens import (
    IGNORE_INDEX,
    sequence_logps,
    summed_nll,
    target_mask,
    token_entropy,
    token_logps,
)


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x), by hand."""
    return math.log(1 + math.exp(x))


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# ----------------------------------------------------------------------------------------------- token log-probs
def random_batch(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 13, generator=g).to(dtype)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a masked prompt
    labels[2, 5:] = IGNORE_INDEX  # right padding
    return logits, labels


def straightforward_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The obvious full-tensor implementation: log_softmax over the vocabulary, gather the next token."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # (B, T-1, V)
    nxt = labels[:, 1:]
    picked = logp.gather(-1, nxt.clamp(min=0)[..., None]).squeeze(-1)
    out = torch.zeros(labels.shape)
    out[:, :-1] = torch.where(nxt != IGNORE_INDEX, picked, 0.0)
    return out


def test_token_logps_by_hand():
    """logits row 0 = [0, ln 3] -> p(1) = 3/4; row 1 = [ln 2, 0] -> p(0) = 2/3; row 2 predicts nothing."""
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    assert token_logps(logits, labels)[0].tolist() == pytest.approx([math.log(3 / 4), math.log(2 / 3), 0.0])
    sums, counts = sequence_logps(logits, labels)
    assert sums.tolist() == pytest.approx([math.log(3 / 4) + math.log(2 / 3)])  # = ln(1/2)
    assert counts.tolist() == [2]


def test_token_logps_equal_log_softmax_gather_and_zero_where_masked():
    logits, labels = random_batch()
    got = token_logps(logits, labels)
    torch.testing.assert_close(got, straightforward_logps(logits, labels))
    assert (got[~target_mask(labels)] == 0).all()
    assert got.dtype == torch.float32 and got.shape == labels.shape
    sums, counts = sequence_logps(logits, labels)
    torch.testing.assert_close(sums, got.sum(-1))
    assert counts.tolist() == [4, 6, 4]  # labels 1..6 are targets; row 0 masks labels 1, 2, row 2 labels 5, 6


def test_chunked_equals_unchunked_values_and_gradients():
    logits, labels = random_batch(1)
    leaves = [logits.clone().requires_grad_() for _ in range(3)]
    whole = token_logps(leaves[0], labels)
    chunked = token_logps(leaves[1], labels, chunk_size=4)
    reference = straightforward_logps(leaves[2], labels)
    torch.testing.assert_close(whole, chunked)
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    for out in (whole, chunked, reference):
        (out * weights).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[2].grad)
    torch.testing.assert_close(leaves[1].grad, leaves[2].grad)


def test_summed_nll_is_minus_the_token_logps_sum():
    logits, labels = random_batch(3)
    total, n = summed_nll(logits, labels, chunk_size=5)
    torch.testing.assert_close(total, -token_logps(logits, labels).sum())
    assert n == int(target_mask(labels).sum()) == 14


def test_no_float32_copy_of_the_logits_is_kept_for_backward():
    """bf16 logits: autograd may keep them (and small per-token vectors), never a float32 (rows, V) tensor."""
    logits, labels = random_batch(4, torch.bfloat16)
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = token_logps(logits, labels, chunk_size=4).sum() + token_entropy(logits, labels, chunk_size=4).sum()
    assert saved and not [x for x in saved if x.dtype == torch.float32 and x.dim() > 1]
    out.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_token_entropy_by_hand_and_chunked():
    """[0, 0] -> ln 2; [0, ln 3] -> p = (1/4, 3/4), H = -(1/4 ln 1/4 + 3/4 ln 3/4); the last row predicts nothing."""
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [1.0, 2.0]]])
    labels = torch.tensor([[0, 1, 1]])
    expected = [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    assert token_entropy(logits, labels)[0].tolist() == pytest.approx(expected)
    logits, labels = random_batch(5)
    logp = torch.log_softmax(logits, -1)
    reference = torch.where(target_mask(labels), -(logp.exp() * logp).sum(-1), 0.0)
    torch.testing.assert_close(token_entropy(logits, labels, chunk_size=3), reference)


# ---------------------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("loss_type,smoothing,expected", [
    ("sigmoid", 0.0, math.log(2)),
    ("sigmoid", 0.1, math.log(2)),  # 0.9 ln 2 + 0.1 ln 2
    ("robust", 0.2, math.log(2)),  # (0.8 ln 2 - 0.2 ln 2) / 0.6
    ("ipo", 0.0, 1 / (4 * 0.5**2)),  # (0 - 1/(2 beta))^2 with beta = 0.5 -> 1
    ("hinge", 0.0, 1.0),  # relu(1 - 0)
])
def test_dpo_identical_chosen_and_rejected(loss_type, smoothing, expected):
    same = t(-3.0, -7.5)
    losses, chosen_rewards, rejected_rewards = dpo_losses(same, same, t(-2.0, -1.0), t(-2.0, -1.0), 0.5, loss_type,
                                                          smoothing)
    assert losses.tolist() == pytest.approx([expected, expected])
    assert chosen_rewards.tolist() == pytest.approx([-0.5, -3.25])  # 0.5 * (-3 + 2), 0.5 * (-7.5 + 1)


@pytest.mark.parametrize("loss_type,smoothing,expected", [
    ("sigmoid", 0.0, softplus(-0.75)),
    ("sigmoid", 0.1, 0.9 * softplus(-0.75) + 0.1 * softplus(0.75)),
    ("robust", 0.1, (0.9 * softplus(-0.75) - 0.1 * softplus(0.75)) / 0.8),
    ("ipo", 0.0, (1.5 - 1 / (2 * 0.5)) ** 2),  # 0.25
    ("hinge", 0.0, 1 - 0.75),
])
def test_dpo_hand_values(loss_type, smoothing, expected):
    """policy (c, r) = (-1, -3), reference (c, r) = (-2, -2.5): h = (-1 + 2) - (-3 + 2.5) = 1.5; beta h = 0.75."""
    losses, chosen_rewards, rejected_rewards = dpo_losses(t(-1.0), t(-3.0), t(-2.0), t(-2.5), 0.5, loss_type,
                                                          smoothing)
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((0.5, -0.25))


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES))
def test_dpo_gradient_raises_chosen_and_lowers_rejected(loss_type):
    chosen, rejected = t(-2.0, grad=True), t(-2.0, grad=True)
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    dpo_losses(chosen, rejected, t(-2.0), t(-2.0), 0.5, loss_type, smoothing)[0].sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    # and raising the chosen log-prob lowers the loss
    low = dpo_losses(t(-2.0), t(-2.0), t(-2.0), t(-2.0), 0.5, loss_type, smoothing)[0]
    high = dpo_losses(t(-1.9), t(-2.0), t(-2.0), t(-2.0), 0.5, loss_type, smoothing)[0]
    assert high.item() < low.item()


def test_dpo_rejects_unknown_type_and_bad_smoothing():
    args = (t(-1.0), t(-1.0), t(-1.0), t(-1.0), 0.1)
    with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge"):
        dpo_losses(*args, "kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_losses(*args, "ipo", 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_losses(*args, "robust", 0.5)


# ------------------------------------------------------------------------------------------------- SimPO, ORPO
def test_simpo_hand_values_and_limit():
    """avg (c, r) = (-0.5, -1.0), beta 2, gamma 0.5: z = 2 * 0.5 - 0.5 = 0.5; equal avgs: z = -gamma."""
    losses, chosen_rewards, rejected_rewards = simpo_losses(t(-0.5, -1.0), t(-1.0, -1.0), beta=2.0, gamma=0.5)
    assert losses.tolist() == pytest.approx([softplus(-0.5), softplus(0.5)])
    assert chosen_rewards.tolist() == pytest.approx([-1.0, -2.0])
    assert rejected_rewards.tolist() == pytest.approx([-2.0, -2.0])
    smoothed = simpo_losses(t(-0.5), t(-1.0), beta=2.0, gamma=0.5, label_smoothing=0.1)[0]
    assert smoothed.item() == pytest.approx(0.9 * softplus(-0.5) + 0.1 * softplus(0.5))
    chosen = t(-1.0, grad=True)
    simpo_losses(chosen, t(-1.0), beta=2.0, gamma=0.5)[0].sum().backward()
    assert chosen.grad.item() < 0


def test_orpo_hand_values():
    """Chosen avg = ln 1/2 (odds 1), rejected avg = ln 1/4 (odds 1/3): log-odds ratio = ln 3,
    -log sigma(ln 3) = ln(1 + 1/3) = ln(4/3). The chosen NLL sum 3 ln 2 over 3 tokens is ln 2 per token."""
    losses, nll, log_odds = orpo_losses(t(3 * math.log(2)), torch.tensor([3]), t(math.log(0.5)), t(math.log(0.25)),
                                        lam=0.1)
    assert log_odds.item() == pytest.approx(math.log(3), rel=1e-6)
    assert nll.item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(4 / 3), rel=1e-6)


def test_orpo_gradient_direction_and_safety_near_zero():
    chosen, rejected = t(-0.5, -1e-9, 0.0, grad=True), t(-1.0, -0.2, -1e-12, grad=True)
    losses = orpo_losses(t(1.0, 1.0, 1.0), torch.tensor([2, 2, 2]), chosen, rejected, lam=1.0)[0]
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert chosen.grad[0] < 0 < rejected.grad[0]


@pytest.mark.parametrize("a", [-1e-4, -0.3, -math.log(2), -2.0, -40.0])
def test_log1mexp_matches_math(a):
    got = log1mexp(torch.tensor(a, dtype=torch.float64)).item()
    assert got == pytest.approx(math.log(-math.expm1(a)), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------- KTO
def test_kto_reference_point_is_a_clamped_detached_mean():
    """Mismatched log-ratios (-1 + 1.4, -1 + 1.2) = (0.4, 0.2): mean 0.3; (0.5, -0.5): 0; (-0.3): clamped to 0."""
    policy = t(-1.0, -1.0, grad=True)
    z0 = kto_reference_point(policy, t(-1.4, -1.2))
    assert z0.item() == pytest.approx(0.3) and not z0.requires_grad
    assert kto_reference_point(t(-1.0, -2.0), t(-1.5, -1.5)).item() == 0.0
    assert kto_reference_point(t(-1.3), t(-1.0)).item() == 0.0


def test_kto_hand_values_and_gradients():
    """beta 0.5, z0 0.3, w_d 1, w_u 1.5, log-ratios (1, 1, -0.5), flags (desirable, undesirable, undesirable):
    1 - sigma(0.5 (1 - 0.3)), 1.5 (1 - sigma(0.5 (0.3 - 1))), 1.5 (1 - sigma(0.5 (0.3 + 0.5)))."""
    policy = t(-1.0, -1.0, -2.5, grad=True)
    losses, rewards = kto_losses(policy, t(-2.0, -2.0, -2.0), torch.tensor([True, False, False]), torch.tensor(0.3),
                                 beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    expected = [1 - sigma(0.35), 1.5 * (1 - sigma(-0.35)), 1.5 * (1 - sigma(0.4))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, 0.5, -0.25])
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1] and policy.grad[2] > 0  # desirable up, undesirable down


# ------------------------------------------------------------------------------------------------ reward model
def test_bradley_terry_hand_values():
    """r_c = (2, 0, 1), r_r = (1, 0.5, 1), margins (0.5, 0, 0): -log sigma(0.5), -log sigma(-0.5), ln 2;
    one pair ordered correctly (the tie is not); centring adds 0.01 (3^2, 0.5^2, 2^2)."""
    chosen, rejected, margin = t(2.0, 0.0, 1.0), t(1.0, 0.5, 1.0), t(0.5, 0.0, 0.0)
    losses, num_correct = bradley_terry_losses(chosen, rejected, margin)
    assert losses.tolist() == pytest.approx([softplus(-0.5), softplus(0.5), math.log(2)])
    assert num_correct.item() == 1
    centred, _ = bradley_terry_losses(chosen, rejected, margin, center_coef=0.01)
    assert (centred - losses).tolist() == pytest.approx([0.09, 0.0025, 0.04])
    r_c = t(0.0, grad=True)
    bradley_terry_losses(r_c, t(0.0))[0].sum().backward()
    assert r_c.grad.item() == pytest.approx(-0.5)  # d/dx -log sigma(x) = -sigma(-x) = -1/2 at 0


# ---------------------------------------------------------------------------------------------------------- PPO
GAE_BY_HAND = [0.1466176, 0.14808, 0.164, 0.2]
"""rewards (0, 0, 0, 1), values (0.5, 0.6, 0.7, 0.8), gamma 0.9, lambda 0.8 (gamma lambda = 0.72):
delta_3 = 1 - 0.8 = 0.2                  A_3 = 0.2
delta_2 = 0.9 * 0.8 - 0.7 = 0.02         A_2 = 0.02 + 0.72 * 0.2 = 0.164
delta_1 = 0.9 * 0.7 - 0.6 = 0.03         A_1 = 0.03 + 0.72 * 0.164 = 0.14808
delta_0 = 0.9 * 0.6 - 0.5 = 0.04         A_0 = 0.04 + 0.72 * 0.14808 = 0.1466176
returns = A + V."""


def test_gae_four_steps_by_hand():
    values = t(0.5, 0.6, 0.7, 0.8)[None]
    advantages, returns = gae(t(0.0, 0.0, 0.0, 1.0)[None], values, torch.ones(1, 4), gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == pytest.approx(GAE_BY_HAND, rel=1e-6)
    assert returns[0].tolist() == pytest.approx([0.6466176, 0.74808, 0.864, 1.0], rel=1e-6)


def test_gae_skips_masked_positions():
    """The same four tokens at positions 1, 2, 4, 5 of 7 (prompt, a gap, padding hold junk) give the same values."""
    rewards = t(9.0, 0.0, 0.0, 9.0, 0.0, 1.0, 9.0)[None]
    values = t(9.0, 0.5, 0.6, 9.0, 0.7, 0.8, 9.0)[None]
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = [0.0, GAE_BY_HAND[0], GAE_BY_HAND[1], 0.0, GAE_BY_HAND[2], GAE_BY_HAND[3], 0.0]
    assert advantages[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert returns[0, 3].item() == 0.0 and returns[0, 5].item() == pytest.approx(1.0)


def test_ppo_clipping_zeroes_the_gradient_on_the_clipped_side():
    """eps 0.2; log-ratios (0.5, -0.5, 0.5, -0.5, 3 masked), advantages (1, 1, -1, -1, 1):
    ratio e^0.5 = 1.65, A > 0: clipped to 1.2, loss -1.2, no gradient;
    ratio e^-0.5 = 0.61, A > 0: unclipped -0.61 beats clipped -0.8, loss -e^-0.5;
    ratio 1.65, A < 0: unclipped 1.65 beats 1.2, loss e^0.5;  ratio 0.61, A < 0: clipped, loss 0.8, no gradient."""
    logps = torch.tensor([[-1.0, -2.0, -1.0, -2.0, 0.0]], requires_grad=True)
    old = t(-1.5, -1.5, -1.5, -1.5, -3.0)[None]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    losses, clipped, approx_kl = clipped_policy_losses(logps, old, t(1.0, 1.0, -1.0, -1.0, 1.0)[None], mask, 0.2)
    e = math.exp(0.5)
    assert losses[0].tolist() == pytest.approx([-1.2, -1 / e, e, 0.8, 0.0], rel=1e-6)
    assert clipped[0].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert approx_kl[0].tolist() == pytest.approx([e - 1 - 0.5, 1 / e - 1 + 0.5, e - 1 - 0.5, 1 / e - 1 + 0.5, 0.0])
    losses.sum().backward()
    # d(-A rho)/d log pi = -A rho where unclipped
    assert logps.grad[0].tolist() == pytest.approx([0.0, -1 / e, e, 0.0, 0.0], rel=1e-6)
    wider = clipped_policy_losses(logps, old, t(1.0, 1.0, -1.0, -1.0, 1.0)[None], mask, 0.2, clip_eps_high=0.8)[1]
    assert wider[0].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]  # 1.65 < 1 + 0.8: no longer clipped


def test_ppo_value_loss_clipping():
    """eps 0.1, V = 1, V_old = 0.8 (clip range [0.7, 0.9]): R = 2: max((1-2)^2, (0.9-2)^2) = 1.21 -> 0.605,
    clipped, no gradient; R = 0: max(1, 0.81) = 1 -> 0.5, gradient V - R = 1."""
    values = torch.tensor([[1.0, 1.0]], requires_grad=True)
    losses, clipped = clipped_value_losses(values, t(0.8, 0.8)[None], t(2.0, 0.0)[None], torch.ones(1, 2), 0.1)
    assert losses[0].tolist() == pytest.approx([0.605, 0.5], rel=1e-6)
    assert clipped[0].tolist() == [1.0, 0.0]
    losses.sum().backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, 1.0])


def test_kl_estimators_by_hand():
    """log pi = -1, log ref = -1.5: k1 = 0.5; k3 = e^{-0.5} - (-0.5) - 1; equal log-probs give 0 for both."""
    logps, ref = t(-1.0, -2.0), t(-1.5, -2.0)
    assert kl_penalty(logps, ref, "k1").tolist() == pytest.approx([0.5, 0.0])
    assert kl_penalty(logps, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 0.5, 0.0], rel=1e-6)
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(logps, ref, "k2")


def test_shaped_rewards_put_the_score_on_the_last_token():
    kl = t(0.1, 0.2, 0.3, 0.4, 0.5, 0.6).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    rewards = shaped_rewards(t(2.0, 3.0), kl, mask, kl_coef=0.5)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, -0.1 + 2, 0.0, 0.0, -0.25, -0.3 + 3])


def test_whiten_by_hand():
    """(1, 2, 3) on the mask: mean 2, population std sqrt(2/3); the masked 100 is ignored and zeroed."""
    out = whiten(t(1.0, 2.0, 3.0, 100.0)[None], torch.tensor([[1, 1, 1, 0]]))
    s = math.sqrt(2 / 3)
    assert out[0].tolist() == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], rel=1e-6)


def test_kl_controllers_by_hand():
    """target 6, horizon 10000, 256 samples: KL 9 -> error clip(0.5) = 0.2, coef 0.2 (1 + 0.2 * 0.0256);
    then KL 5.4 -> error -0.1, coef *= 1 - 0.1 * 0.0256."""
    adaptive = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    adaptive.update(9.0, 256)
    assert adaptive.value == pytest.approx(0.2 * 1.00512)
    adaptive.update(5.4, 256)
    assert adaptive.value == pytest.approx(0.2 * 1.00512 * 0.99744)
    restored = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


# --------------------------------------------------------------------------------------------------------- GRPO
def test_group_advantages_by_hand_and_constant_group_is_exactly_zero():
    """Group (1, 0, 0): mean 1/3, sample std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3); group (0.1, 0.1, 0.1): 0
    although 0.1 + 0.1 + 0.1 = 0.30000000000000004 in floating point."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.1, 0.1, 0.1], dtype=torch.float64)
    advantages = group_advantages(rewards, group_size=3, eps=0.0)
    s = math.sqrt(1 / 3)
    assert advantages[:3].tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s])
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(rewards, 3, scale_by_std=False).tolist()[:3] == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 4)


def test_grpo_losses_sequence_and_token_normalisation():
    """On-policy (ratio 1): per-token loss -A. A = (1, -0.5); sequence lengths 2 and 3.
    sequence: losses (-1, 0.5), units (1, 1), gradient -A / length per token; token: (-2, 1.5), units (2, 3)."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    advantages = t(1.0, -0.5)
    losses, units, metrics = grpo_losses(logps, advantages, mask, normalisation="sequence")
    assert losses.tolist() == pytest.approx([-1.0, 0.5]) and units.tolist() == [1.0, 1.0]
    assert metrics["clip_fraction"].item() == 0.0
    losses.sum().backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 0.0, 0.5 / 3, 0.5 / 3, 0.5 / 3])
    losses, units, _ = grpo_losses(logps, advantages, mask, normalisation="token")
    assert losses.tolist() == pytest.approx([-2.0, 1.5]) and units.tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="sequence, token"):
        grpo_losses(logps, advantages, mask, normalisation="batch")


def test_grpo_kl_term_by_hand():
    """log pi = -1, log ref = -1.5 everywhere: k3 = e^{-0.5} - 0.5 per token; beta 0.1 adds 0.1 k3 to each
    sequence's token-mean; the kl metric sums the two sequences' means: 2 k3."""
    k3 = math.exp(-0.5) - 0.5
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logps, ref = torch.full((2, 3), -1.0), torch.full((2, 3), -1.5)
    losses, _, metrics = grpo_losses(logps, t(1.0, -0.5), mask, ref_logps=ref, beta=0.1)
    assert losses.tolist() == pytest.approx([-1.0 + 0.1 * k3, 0.5 + 0.1 * k3], rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(2 * k3, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_losses(logps, t(1.0, -0.5), mask, beta=0.1)
