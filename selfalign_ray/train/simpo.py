"""The SimPO loss (Meng et al., 2024), reference-free and length-normalised.

    r(x, y)  = beta * (1/|y|) * log pi(y | x)                     (avg per-token log-prob, scaled)
    L        = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma )
             = -log sigmoid( beta * (avg_logp_w - avg_logp_l - gamma/beta) )

gamma is given as `gamma_beta_ratio` = gamma / beta, as in the SimPO repository. With label smoothing
eps the target is "w beats l with probability 1 - eps" (conservative SimPO):
    L = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z),  z = avg_logp_w - avg_logp_l - gamma/beta
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float,
               gamma_beta_ratio: float, label_smoothing: float = 0.0):
    """Per-example SimPO losses and the (detached) rewards beta * avg_logp of chosen and rejected.

    chosen_logps / rejected_logps: average per-token log-probs of each response, shape (B,).
    """
    z = chosen_logps - rejected_logps - gamma_beta_ratio
    losses = (-F.logsigmoid(beta * z) * (1 - label_smoothing)
              - F.logsigmoid(-beta * z) * label_smoothing)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
