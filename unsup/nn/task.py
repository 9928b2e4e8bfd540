"""The training task of the segmentation networks trained on (image, target) batches
(``supervised``, ``boxsup``): AdamW with a warm-up and polynomial decay, cross-entropy
(+ Dice), mixed precision on CUDA, and the validator's metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from unsup.nn.losses import segmentation_loss
from unsup.nn.runtime import resolve_device

__all__ = ["SegmentationTask"]


class SegmentationTask:
    """Train a segmenter with cross-entropy (+ Dice) on (image, target) batches.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a float batch of uint8-range RGB images (N, 3, H, W) to logits (N, C, H, W)
        (the networks of :mod:`unsup.nn.networks` normalise internally). Parameters of a
        submodule ``encoder`` get ``lr * encoder_lr_scale``.
    lr, weight_decay : float
        AdamW settings.
    total_steps : int
        Length of the run, for the polynomial learning-rate decay
        ``(1 - step / total_steps) ** 0.9`` after ``warmup_steps`` of linear warm-up.
    class_weights : sequence of float, optional
    dice_weight : float
    validator : callable, optional
        ``validator(model) -> dict of metrics``, called by :meth:`validate`.
    device : torch.device or str, optional
        Default: CUDA when available. Mixed precision (float16 autocast + gradient scaling)
        is used on CUDA.
    """

    def __init__(self, model, *, lr: float = 1e-3, weight_decay: float = 1e-4,
                 encoder_lr_scale: float = 0.1, total_steps: int = 1000, warmup_steps: int = 0,
                 class_weights: Sequence[float] | None = None, dice_weight: float = 0.0,
                 validator: Callable | None = None, device=None):
        import torch

        self.device = resolve_device(device)
        self.model = model.to(self.device)
        encoder = getattr(model, "encoder", None)
        enc_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
        enc_params = [p for p in model.parameters() if id(p) in enc_ids and p.requires_grad]
        other = [p for p in model.parameters() if id(p) not in enc_ids and p.requires_grad]
        groups = [{"params": other, "lr": lr}]
        if enc_params:
            groups.append({"params": enc_params, "lr": lr * encoder_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        total = max(int(total_steps), 1)
        warm = max(int(warmup_steps), 0)

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            return max(1.0 - step / total, 0.0) ** 0.9

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.class_weights = (None if class_weights is None else
                              torch.as_tensor(class_weights, dtype=torch.float32,
                                              device=self.device))
        self.dice_weight = float(dice_weight)
        self.validator = validator

    def train_step(self, batch) -> dict[str, float]:
        import torch

        images, targets = batch
        images = images.to(self.device, non_blocking=True).float()
        targets = targets.to(self.device, non_blocking=True).long()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.model(images)
        loss, parts = self.compute_loss(logits, targets, images=images)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": float(loss.detach()), **parts}

    def compute_loss(self, logits, targets, *, images=None):
        """The training loss of one batch and a dict of extra values to log (subclasses with
        other targets or image-dependent terms override this)."""
        return segmentation_loss(logits, targets, class_weights=self.class_weights,
                                 dice_weight=self.dice_weight), {}

    def validate(self) -> dict[str, float]:
        if self.validator is None:
            return {}
        self.model.eval()
        return dict(self.validator(self.model))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
