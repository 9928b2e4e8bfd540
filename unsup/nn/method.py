"""The base class of the methods that train a segmentation network (``supervised``,
``boxsup``), and their option groups.

A :class:`NetworkMethod` streams its samples once into an on-disk cache
(:class:`unsup.nn.data.SampleCache`, ``OUT_DIR/cache``), builds the network of
:func:`unsup.nn.networks.build_segmenter` and trains it with the one loop
(:func:`unsup.nn.loop.train`): cross-entropy (+ optional Dice), flips, rescaling, random
crops and colour jitter. ``predict`` returns the class labels and the softmax probabilities
(for the dense CRF), computed at the working resolution ``max_side`` and resized back.

Subclasses say what is cached per sample (:meth:`NetworkMethod._prepare_item`) and may
change the task (:meth:`NetworkMethod._make_task`), the batches
(:meth:`NetworkMethod._batches`) or the targets (:meth:`NetworkMethod._target_loader`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from unsup.base import OptionGroup, RunOptions, Segmentation, SegmentationMethod, check_image
from unsup.nn.data import SampleCache, prepare_mask_item

__all__ = ["NetworkMethod", "NetworkOptions", "AugmentOptions"]


class NetworkOptions(OptionGroup):
    """The segmentation network and its optimisation (a method's ``network__*`` options).

    Parameters
    ----------
    decoder : {"fcn", "unet", "deeplab"}
    backbone : str
        Encoder (:func:`unsup.backbones.build_encoder`).
    pretrained : bool
        ImageNet encoder weights.
    freeze_blocks : int
        Freeze the encoder stem and the first ``freeze_blocks - 1`` blocks (0 = fine-tune all,
        -1 = freeze the whole encoder): less compute per step on a CPU.
    epochs : int
        Training epochs (``fit(run=RunOptions(epochs=...))`` overrides).
    batch_size : int
        Crops per step.
    lr, weight_decay, encoder_lr_scale : float
        AdamW learning rate (decoder; the encoder gets ``lr * encoder_lr_scale``), weight decay.
    dice_weight : float
        Weight of the soft Dice loss added to the cross-entropy.
    class_weighting : {"none", "balanced"}
        Median-frequency class weights for the cross-entropy.
    patience : int, optional
        Early stopping on the validation mIoU (when validation samples are given and the
        method keeps the best epoch, ``select_best``).
    num_workers : int
        DataLoader worker processes (0 = load in the training process).
    device : str, optional
        ``cpu`` / ``cuda``; default CUDA when available.
    """

    def __init__(self, *, decoder: str = "unet", backbone: str = "efficientnet-lite0",
                 pretrained: bool = True, freeze_blocks: int = 0, epochs: int = 20,
                 batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-4,
                 encoder_lr_scale: float = 0.1, dice_weight: float = 0.0,
                 class_weighting: str = "none", patience: int | None = None,
                 num_workers: int = 0, device: str | None = None):
        self.decoder = decoder
        self.backbone = backbone
        self.pretrained = pretrained
        self.freeze_blocks = freeze_blocks
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.encoder_lr_scale = encoder_lr_scale
        self.dice_weight = dice_weight
        self.class_weighting = class_weighting
        self.patience = patience
        self.num_workers = num_workers
        self.device = device


class AugmentOptions(OptionGroup):
    """Augmentation of the training crops (a method's ``augment__*`` options).

    Parameters
    ----------
    crop_size : int
        Side of the square random crops (pixels of the working resolution).
    scale_range : (float, float)
        Random rescaling of the training images.
    hflip : bool
        Random horizontal flips.
    color_jitter : float
        Brightness / contrast / saturation jitter strength.
    """

    def __init__(self, *, crop_size: int = 224, scale_range=(0.7, 1.3), hflip: bool = True,
                 color_jitter: float = 0.2):
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.hflip = hflip
        self.color_jitter = color_jitter


class NetworkMethod(SegmentationMethod):
    """Shared machinery of the network-based methods (not registered itself).

    Subclasses take ``network`` (:class:`NetworkOptions`), ``augment``
    (:class:`AugmentOptions`), ``n_classes``, ``max_side``, ``select_best``, ``flip_test`` and
    ``seed`` plus their own hyper-parameters, and define :meth:`_prepare_item` (what to cache
    per sample).
    """

    produces_scores = True
    trains_network = True

    # -- hooks --------------------------------------------------------------------------------
    def _prepare_item(self, sample, index, shape, cache_dir, small_image) -> dict:
        raise NotImplementedError

    def _fingerprint(self) -> dict:
        return {"kind": self.supervision, "max_side": self.max_side}

    def _n_classes_from(self, cache: SampleCache) -> int:
        top = max((it.get("max_label", 0) for it in cache.items), default=0)
        return max(int(top) + 1, 2)

    # -- helpers ------------------------------------------------------------------------------
    def _device(self):
        from unsup.nn.runtime import resolve_device

        return resolve_device(self.network.device)

    def _build_network(self, n_classes: int, *, pretrained: bool | None = None):
        from unsup.nn.networks import build_segmenter

        options = self.network
        network = build_segmenter(options.decoder, n_classes, backbone=options.backbone,
                                  pretrained=options.pretrained if pretrained is None
                                  else pretrained)
        self._freeze(network)
        return network

    def _freeze(self, network) -> None:
        """Freeze the first ``freeze_blocks`` stages of the encoder (0 = train it all;
        -1 = freeze the whole encoder)."""
        n = int(self.network.freeze_blocks or 0)
        if n == 0:
            return
        encoder = network.encoder
        parts = [getattr(encoder, "stem", None)] + list(getattr(encoder, "blocks", []))
        parts = [p for p in parts if p is not None]
        if n < 0 or not parts:
            parts = [encoder]
        for part in parts[:n] if n > 0 else parts:
            part.requires_grad_(False)

    def _class_weights(self, cache: SampleCache, n_classes: int):
        weighting = self.network.class_weighting
        if weighting in (None, "none"):
            return None
        if weighting != "balanced":
            raise ValueError(f"class_weighting must be 'none' or 'balanced', got {weighting!r}")
        counts = np.zeros(n_classes, np.float64)
        for it in cache.items:
            c = np.asarray(it.get("class_counts", []), np.float64)[:n_classes]
            counts[: c.size] += c
        freq = counts / max(counts.sum(), 1.0)
        present = freq > 0
        # median frequency balancing (Eigen & Fergus, ICCV 2015), absent classes weight 1
        weights = np.ones(n_classes)
        weights[present] = np.median(freq[present]) / freq[present]
        return weights.tolist()

    def _validator(self, val_cache: SampleCache | None, n_classes: int):
        if val_cache is None:
            return None
        from unsup.nn.networks import predict_probabilities
        from unsup.nn.validation import validation_scores

        def validate(model) -> dict:
            return validation_scores(
                ((predict_probabilities(model, val_cache.image(i)).argmax(0),
                  val_cache.target(i)) for i in range(len(val_cache))), n_classes)

        return validate

    def _target_loader(self, cache: SampleCache):
        def load_pair(i):
            return cache.image(i), cache.target(i)

        return load_pair

    def _epochs_of(self, run: RunOptions) -> int:
        epochs = self.network.epochs if run.epochs is None else run.epochs
        if not isinstance(epochs, int | np.integer) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if run.max_minutes is not None and not run.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {run.max_minutes!r}")
        return int(epochs)

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, samples, *, val_samples=None, run: RunOptions | None = None,
            progress: bool = False):
        """Train on ``samples`` (a re-iterable of :class:`unsup.datasets.Sample`).

        Parameters
        ----------
        samples : iterable of Sample
            Streamed once into ``run.out_dir/cache``.
        val_samples : iterable of Sample, optional
            Validation samples with ground-truth masks: per-epoch mIoU (labels outside the
            network's classes are refused, as the harness refuses them), best-epoch weights
            kept with ``select_best``, early stopping with ``network.patience``.
        run : RunOptions, optional
            ``out_dir`` (cache, checkpoints, history, curves; default a temporary directory
            removed afterwards), ``epochs`` (overrides ``network.epochs``), ``max_minutes``
            (time budget of the training loop; the cache pass is not counted) and ``resume``
            (continue the run whose checkpoint is in ``out_dir``).
        progress : bool

        Returns
        -------
        self
        """
        run = RunOptions() if run is None else run
        epochs = self._epochs_of(run)
        if run.out_dir is None:
            if run.resume:
                raise ValueError("resume=True needs out_dir (where the checkpoint is)")
            with tempfile.TemporaryDirectory(prefix=f"unsup-{self.name}-") as tmp:
                return self._fit(samples, val_samples, Path(tmp), epochs, run.max_minutes,
                                 False, progress)
        return self._fit(samples, val_samples, Path(run.out_dir), epochs, run.max_minutes,
                         run.resume, progress)

    def _fit(self, samples, val_samples, out_dir: Path, epochs, max_minutes, resume, progress):
        import torch

        from unsup.nn.data import SegmentationTrainingSet, make_batch_maker
        from unsup.nn.loop import train
        from unsup.nn.runtime import seed_all
        from unsup.nn.validation import check_truth_labels

        t_start = time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        cache = SampleCache.build(samples, out_dir / "cache", max_side=self.max_side,
                                  fingerprint=self._fingerprint(), prepare=self._prepare_item,
                                  progress=progress, desc=f"{self.name}: caching")
        n_classes = int(self.n_classes) if self.n_classes else self._n_classes_from(cache)
        val_cache = None
        if val_samples is not None:
            val_cache = SampleCache.build(val_samples, out_dir / "val_cache",
                                          max_side=self.max_side,
                                          fingerprint={"kind": "masks",
                                                       "max_side": self.max_side},
                                          prepare=prepare_mask_item, progress=progress,
                                          desc=f"{self.name}: caching validation")
            # refused before training rather than after its first epoch
            check_truth_labels(range(self._n_classes_from(val_cache)), n_classes)
        seed_all(self.seed)
        network = self._build_network(n_classes)
        augment = self.augment
        loader = SegmentationTrainingSet(self._target_loader(cache), len(cache),
                                         crop_size=augment.crop_size,
                                         scale_range=tuple(augment.scale_range),
                                         hflip=augment.hflip, color_jitter=augment.color_jitter,
                                         seed=self.seed)
        make_batches = make_batch_maker(loader,
                                        batch_size=min(self.network.batch_size, len(cache)),
                                        seed=self.seed, num_workers=self.network.num_workers)
        task = self._make_task(network, cache=cache, val_cache=val_cache, n_classes=n_classes,
                               total_steps=epochs * make_batches.steps_per_epoch,
                               out_dir=out_dir, epochs=epochs)
        prep_seconds = time.monotonic() - t_start
        monitor = "miou" if val_cache is not None and self.select_best else None
        history = train(task, self._batches(make_batches, cache, out_dir), out_dir=out_dir,
                        epochs=epochs, max_minutes=max_minutes, resume=resume, seed=self.seed,
                        monitor=monitor, mode="max",
                        patience=self.network.patience if monitor else None, progress=progress)
        network = task.model.to("cpu").eval()
        self.network_ = network
        self.n_classes_ = n_classes
        self.history_ = {
            "epochs_run": len(history.epochs), "stopped": history.stopped,
            "best_epoch": history.best_epoch, "best_val_miou": history.best_value,
            "train_seconds": round(history.train_seconds, 2),
            "preparation_seconds": round(prep_seconds, 2),
            "last": history.last, "n_train": len(cache),
            "n_val": 0 if val_cache is None else len(val_cache),
            "threads": torch.get_num_threads(),
        }
        return self

    def training_history(self) -> dict:
        return dict(getattr(self, "history_", {}))

    def _batches(self, make_batches, cache, out_dir):
        return make_batches

    def _task_options(self, *, cache, val_cache, n_classes: int, total_steps: int) -> dict:
        """The keyword arguments of :class:`unsup.nn.task.SegmentationTask` (also those of a
        subclass's task)."""
        options = self.network
        return dict(lr=options.lr, weight_decay=options.weight_decay,
                    encoder_lr_scale=options.encoder_lr_scale, total_steps=total_steps,
                    warmup_steps=min(total_steps // 10, 50),
                    class_weights=self._class_weights(cache, n_classes),
                    dice_weight=options.dice_weight,
                    validator=self._validator(val_cache, n_classes), device=self._device())

    def _make_task(self, network, *, cache, val_cache, n_classes, total_steps, out_dir, epochs):
        from unsup.nn.task import SegmentationTask

        return SegmentationTask(network, **self._task_options(
            cache=cache, val_cache=val_cache, n_classes=n_classes, total_steps=total_steps))

    # -- prediction ---------------------------------------------------------------------------
    def predict(self, image: np.ndarray) -> Segmentation:
        from unsup.nn.networks import predict_probabilities

        self._check_fitted()
        image = check_image(image)
        network = self.network_.to(self._device())
        probs = predict_probabilities(network, image, max_side=self.max_side,
                                      flip=bool(self.flip_test))
        return Segmentation(labels=probs.argmax(0).astype(np.int32), scores=probs,
                            info={"n_classes": int(self.n_classes_)})

    # -- persistence --------------------------------------------------------------------------
    def _state_dict(self):
        if not hasattr(self, "network_"):
            return None
        return {"network": self.network_.state_dict(),
                "meta": json.dumps({"n_classes": int(self.n_classes_),
                                    "history": self.training_history()}, default=str)}

    def _load_state_dict(self, state: dict) -> None:
        meta = json.loads(state["meta"])
        network = self._build_network(int(meta["n_classes"]), pretrained=False)
        network.load_state_dict(state["network"])
        self.network_ = network.eval()
        self.n_classes_ = int(meta["n_classes"])
        self.history_ = meta.get("history", {})
