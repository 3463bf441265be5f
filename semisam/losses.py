"""Semi-SAM+ losses and their schedules (handbook §6, DESIGN §4).

L_total = L_sup + λ(t)·L_con + β(t)·L_rs-con, where

* L_sup: Dice + cross-entropy on labeled blocks (MONAI ``DiceCELoss``; sigmoid for one
  structure, softmax over background + K structures otherwise; Dice over the whole batch,
  which escapes the all-background start sooner on small targets);
* L_con: mean squared difference between the student's and the EMA teacher's probabilities;
* L_rs-con against the SAM teachers' pseudo-label p_f on voxels where the teachers agree
  (M_conf). ``loss.pseudo_loss: mse`` is the handbook's Σ M_conf·(p_s − p_f)² / Σ M_conf;
  ``dice_ce`` (the default) is Dice + cross-entropy restricted to M_conf against the
  binarised pseudo-label (p_f > 0.5), on the same scale as L_sup. The MSE averages over every
  confident voxel, nearly all of them trivial background, so its gradient on the boundary
  voxels that matter is about 100x smaller than the Dice term's of L_sup (see the README's
  semi-supervised table for what each form measured);
* λ(t) = λ_max · exp(−5 (1 − t/T_r)²) for t < T_r, else λ_max (the usual "sigmoid" ramp-up of
  mean-teacher training; the handbook's literal ``sigmoid(t/T_r)`` would start at λ_max/2 on an
  untrained student); β(t) = β_max · exp(−t/T_d). t counts epochs since phase 1 started
  (fractional within an epoch).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def sigmoid_rampup(t: float, length: float) -> float:
    """exp(−5 (1 − t/length)²) clipped to [0, 1]; 1 for length 0."""
    if length <= 0:
        return 1.0
    p = min(max(t / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - p) ** 2))


def consistency_weight(t: float, lambda_max: float, ramp_up: float) -> float:
    """λ(t)."""
    return float(lambda_max) * sigmoid_rampup(t, ramp_up)


def pseudo_weight(t: float, beta_max: float, ramp_down: float) -> float:
    """β(t) = β_max · exp(−t / T_d)."""
    return float(beta_max) * math.exp(-max(t, 0.0) / float(ramp_down))


class SupervisedLoss(torch.nn.Module):
    """Dice + CE (MONAI) for logits ``(B, K', D, H, W)`` and integer labels ``(B, 1, D, H, W)``."""

    def __init__(self, out_channels: int, dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceCELoss

        self.binary = out_channels == 1
        self.loss = DiceCELoss(
            sigmoid=self.binary, softmax=not self.binary, to_onehot_y=not self.binary,
            lambda_dice=dice_weight, lambda_ce=ce_weight, smooth_nr=1e-5, smooth_dr=1e-5, batch=True,
        )

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        target = label.float() if self.binary else label.long()
        if self.binary:
            target = (target > 0).float()
        return self.loss(logits.float(), target)


def consistency_loss(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """L_con: mean squared difference of probabilities (the teacher side carries no gradient)."""
    return torch.mean((p_student.float() - p_teacher.detach().float()) ** 2)


def pseudo_label_loss(p_student: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, kind: str = "dice_ce",
                      dice_weight: float = 1.0, ce_weight: float = 1.0, eps: float = 1e-6) -> Optional[torch.Tensor]:
    """L_rs-con in the configured form; None when no voxel is confident.

    ``kind="mse"``: :func:`region_consistency_loss`. ``kind="dice_ce"``: soft Dice (MONAI's
    ``DiceLoss`` over the batch, on ``M_conf·p_s`` against ``M_conf·1[p_f > 0.5]``) plus binary
    cross-entropy averaged over the confident voxels. Shapes as for
    :func:`region_consistency_loss` (per-structure foreground probabilities)."""
    if kind == "mse":
        return region_consistency_loss(p_student, pseudo, confidence, eps)
    if kind != "dice_ce":
        raise ValueError(f"pseudo-label loss must be 'dice_ce' or 'mse', got {kind!r}")
    conf = confidence.float()
    total = conf.sum()
    if float(total) < 1.0:
        return None
    from monai.losses import DiceLoss

    p = p_student.float()
    target = (pseudo.float() > 0.5).float()
    out = p.new_zeros(())
    if dice_weight > 0:
        dice = DiceLoss(sigmoid=False, softmax=False, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        out = out + dice_weight * dice(p * conf, target * conf)
    if ce_weight > 0:
        bce = torch.nn.functional.binary_cross_entropy(p.clamp(eps, 1.0 - eps), target, weight=conf, reduction="sum")
        out = out + ce_weight * bce / (total + eps)
    return out


def region_consistency_loss(p_student: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, eps: float = 1e-6) -> Optional[torch.Tensor]:
    """L_rs-con = Σ M_conf (p_s − p_f)² / Σ M_conf; None when no voxel is confident.

    Shapes broadcast: ``p_student`` (B, K', D, H, W) foreground probabilities per channel,
    ``pseudo`` and ``confidence`` the same shape (confidence in {0, 1}).
    """
    conf = confidence.float()
    total = conf.sum()
    if float(total) < 1.0:
        return None
    return ((p_student.float() - pseudo.float()) ** 2 * conf).sum() / (total + eps)
