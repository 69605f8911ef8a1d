"""SimPO loss against hand-computed values.

    z    = avg_logp_w - avg_logp_l - gamma/beta
    loss = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z)
    rewards = beta * avg_logp

Example 1: avg_logp_w = -1.0, avg_logp_l = -1.5, beta = 2, gamma/beta = 0.25
    z = 0.5 - 0.25 = 0.25;  beta * z = 0.5;  loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
Example 2: avg_logp_w = -2.0, avg_logp_l = -1.0 (the model prefers the loser), same beta and ratio
    z = -1.25;  beta * z = -2.5;  loss = log(1 + e^2.5) = 2.578889
With eps = 0.1 on example 1: 0.9 * 0.474077 + 0.1 * log(1 + e^0.5) = 0.9 * 0.474077 + 0.1 * 0.974077 = 0.524077
"""

import math

import pytest
import torch

from selfalign_ray.train.simpo import simpo_loss


def test_hand_computed_values_and_rewards():
    w = torch.tensor([-1.0, -2.0])
    l = torch.tensor([-1.5, -1.0])
    losses, rw, rl = simpo_loss(w, l, beta=2.0, gamma_beta_ratio=0.25)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(2.5))], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.474077, 2.578889], abs=1e-6)
    assert rw.tolist() == [-2.0, -4.0] and rl.tolist() == [-3.0, -2.0]


def test_label_smoothing():
    losses, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), 2.0, 0.25, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * 0.474077 + 0.1 * 0.974077, abs=1e-6)


def test_margin_gamma_shifts_the_decision_point():
    # Equal log-probs: z = -gamma/beta, so the loss is above log 2 whenever gamma > 0.
    losses, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), 10.0, 0.3)
    assert losses.item() == pytest.approx(math.log1p(math.exp(3.0)), abs=1e-6)
    zero, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), 10.0, 0.0)
    assert zero.item() == pytest.approx(math.log(2), abs=1e-6)


def test_gradient_raises_chosen_and_lowers_rejected():
    w = torch.tensor([-1.2], requires_grad=True)
    l = torch.tensor([-1.1], requires_grad=True)
    losses, rw, _ = simpo_loss(w, l, beta=10.0, gamma_beta_ratio=0.3)
    losses.sum().backward()
    assert w.grad.item() < 0 < l.grad.item()  # descent raises avg_logp_w, lowers avg_logp_l
    assert w.grad.item() == pytest.approx(-l.grad.item())
    assert not rw.requires_grad
