"""Asymmetric Loss (Ridnik et al., 2021), as the ML-Decoder MS-COCO recipe uses it."""
from __future__ import annotations

import torch
from torch import nn


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss for multi-label classification, summed over samples and classes.

    With p = sigmoid(logit) and, for negatives, the shifted probability p_m = max(p - clip, 0):

        positives: -(1 - p)^gamma_pos * log(p)
        negatives: -p_m^gamma_neg * log(1 - p_m)

    Probabilities are clamped at ``eps`` inside the logs. With ``detach_focal_weight`` (the
    recipe's setting, the official ``disable_torch_grad_focal_loss=True``) the focusing weights
    are constants for the backward. The loss is computed in float32, or float64 for float64 logits.

    Args:
        gamma_neg, gamma_pos: focusing exponents (recipe: 4 and 0).
        clip: probability margin for negatives (recipe: 0.05); 0 disables it.
        eps: clamp inside the logarithms.
        detach_focal_weight: treat the focusing weights as constants in the backward.
    """

    def __init__(self, gamma_neg: float = 4, gamma_pos: float = 0, clip: float = 0.05,
                 eps: float = 1e-8, detach_focal_weight: bool = True):
        super().__init__()
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps
        self.detach_focal_weight = detach_focal_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"AsymmetricLoss: logits {tuple(logits.shape)} and targets "
                             f"{tuple(targets.shape)} differ in shape")
        x = logits if logits.dtype == torch.float64 else logits.float()
        y = targets.to(x.dtype)
        p_pos = torch.sigmoid(x)
        p_neg = 1 - p_pos                      # probability of "absent"
        if self.clip and self.clip > 0:
            p_neg = (p_neg + self.clip).clamp(max=1)
        loss = y * torch.log(p_pos.clamp(min=self.eps)) + (1 - y) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_focal_weight):
                pt = p_pos * y + p_neg * (1 - y)                       # probability of the truth
                gamma = self.gamma_pos * y + self.gamma_neg * (1 - y)
                weight = torch.pow(1 - pt, gamma)
            loss = loss * weight
        return -loss.sum()

    def extra_repr(self) -> str:
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
                f"eps={self.eps}, detach_focal_weight={self.detach_focal_weight}")
