"""Losses of the segmentation networks, and the target value of pixels without a label."""

from __future__ import annotations

__all__ = ["IGNORE", "segmentation_loss"]

#: Target value of pixels that do not contribute to the loss (void, crowd, uncertain).
IGNORE = 255


def segmentation_loss(logits, target, *, ignore_index: int = IGNORE, class_weights=None,
                      dice_weight: float = 0.0):
    """Cross-entropy (+ ``dice_weight`` x soft Dice loss) over the non-ignored pixels.

    Parameters
    ----------
    logits : Tensor, shape (N, C, H, W)
    target : Tensor of int64, shape (N, H, W)
        Class ids ``0..C-1`` or ``ignore_index``.
    class_weights : Tensor of shape (C,), optional
        Per-class weights of the cross-entropy.
    dice_weight : float
        Weight of the soft multi-class Dice loss (mean over the classes present in the
        target or predicted), 0 = cross-entropy only.

    Returns
    -------
    Tensor (scalar)
        Zero (with a gradient) when every pixel is ignored.
    """
    import torch
    import torch.nn.functional as F

    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target, weight=class_weights,
                         ignore_index=ignore_index)
    if dice_weight <= 0:
        return ce
    probs = torch.softmax(logits.float(), dim=1)
    n_classes = logits.shape[1]
    safe = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, n_classes).permute(0, 3, 1, 2).float()
    mask = valid.unsqueeze(1).float()
    probs, onehot = probs * mask, onehot * mask
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = denom > 0
    dice = 1.0 - (2.0 * inter[present] + 1.0) / (denom[present] + 1.0)
    return ce + dice_weight * dice.mean()
