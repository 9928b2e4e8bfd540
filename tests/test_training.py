"""The training package (unsup.nn): the loop's checkpoints, resume, time budget, early
stopping and history; the segmentation loss; validation scores; augmentation."""

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from unsup.augment import augment_pair, resize_labels
from unsup.nn.data import SegmentationTrainingSet, make_batch_maker
from unsup.nn.loop import TrainingHistory, load_checkpoint, train
from unsup.nn.losses import IGNORE, segmentation_loss
from unsup.nn.task import SegmentationTask
from unsup.nn.validation import validation_scores


class ToyTask:
    """Linear regression with dropout (so the torch RNG matters) and an LR schedule."""

    def __init__(self, *, sleep=0.0, metrics=None):
        torch.manual_seed(123)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.5)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.7)
        self.sleep = sleep
        self.metrics = list(metrics or [])
        self.epochs_ended = []

    def train_step(self, batch):
        x, y = batch
        if self.sleep:
            time.sleep(self.sleep)
        self.model.train()
        loss = ((self.model(x) - y) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        value = float(loss.detach())
        return {"mse": value, "half": value / 2}

    def end_epoch(self, epoch):
        self.epochs_ended.append(epoch)
        self.sched.step()

    def validate(self):
        if self.metrics:
            return {"score": self.metrics.pop(0)}
        return {}

    def state_dict(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])


def toy_batches(seed=0, n_batches=6):
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def make(epoch):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for _ in range(n_batches):
            x = torch.randn(8, 4, generator=g)
            yield x, x @ w

    make.steps_per_epoch = n_batches
    return make


def weights(task):
    return torch.cat([p.detach().flatten() for p in task.model.parameters()])


def test_run_writes_checkpoint_history_and_curves(tmp_path):
    task = ToyTask()
    hist = train(task, toy_batches(), out_dir=tmp_path, epochs=3, progress=False, seed=1)
    assert isinstance(hist, TrainingHistory)
    assert [r["epoch"] for r in hist.epochs] == [1, 2, 3]
    assert hist.stopped == "completed"
    assert task.epochs_ended == [0, 1, 2]
    assert hist.epochs[-1]["mse"] < hist.epochs[0]["mse"]
    assert hist.epochs[0]["half"] == pytest.approx(hist.epochs[0]["mse"] / 2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 0
    data = json.loads((tmp_path / "history.json").read_text())
    assert len(data["epochs"]) == 3 and data["stopped"] == "completed"
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_resume_after_epoch_equals_uninterrupted_run(tmp_path):
    a = ToyTask()
    hist_a = train(a, toy_batches(), out_dir=tmp_path / "a", epochs=4, progress=False, seed=5)
    b = ToyTask()
    train(b, toy_batches(), out_dir=tmp_path / "b", epochs=2, progress=False, seed=5)
    b2 = ToyTask()  # a fresh process would rebuild the task from scratch
    hist_b = train(b2, toy_batches(), out_dir=tmp_path / "b", epochs=4, resume=True,
                   progress=False, seed=5)
    assert torch.equal(weights(a), weights(b2))
    assert hist_b.series("mse") == hist_a.series("mse")
    assert len(hist_b.epochs) == 4


def test_resume_mid_epoch_after_time_budget_equals_uninterrupted_run(tmp_path):
    a = ToyTask()
    train(a, toy_batches(), out_dir=tmp_path / "a", epochs=2, progress=False, seed=2)
    b = ToyTask(sleep=0.03)
    hist = train(b, toy_batches(), out_dir=tmp_path / "b", epochs=2, progress=False, seed=2,
                 max_minutes=0.04 / 60)
    assert hist.stopped == "time_budget"
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["epoch"] == 0 and 0 < state["step"] < 6  # stopped inside the first epoch
    c = ToyTask()
    hist_c = train(c, toy_batches(), out_dir=tmp_path / "b", epochs=2, resume=True,
                   progress=False, seed=2)
    assert torch.equal(weights(a), weights(c))
    assert hist_c.stopped == "completed"
    hist_a = TrainingHistory.from_dict(json.loads((tmp_path / "a" / "history.json").read_text()))
    np.testing.assert_allclose(hist_c.series("mse"), hist_a.series("mse"), rtol=1e-12)


def test_make_batches_with_start_skips_without_generating(tmp_path):
    calls = []
    base = toy_batches()

    def make(epoch, start=0):
        calls.append((epoch, start))
        return list(base(epoch))[start:]

    make.steps_per_epoch = 6
    t = ToyTask(sleep=0.03)
    train(t, make, out_dir=tmp_path, epochs=1, progress=False, max_minutes=0.04 / 60)
    step = load_checkpoint(tmp_path / "checkpoint.pt")["step"]
    train(ToyTask(), make, out_dir=tmp_path, epochs=1, resume=True, progress=False)
    assert calls[-1] == (0, step)


def test_max_minutes_stops_in_time_with_usable_checkpoint(tmp_path):
    task = ToyTask(sleep=0.02)
    t0 = time.monotonic()
    hist = train(task, toy_batches(), out_dir=tmp_path, epochs=10_000, max_minutes=0.5 / 60,
                 progress=False)
    elapsed = time.monotonic() - t0
    assert hist.stopped == "time_budget"
    assert elapsed < 3.0  # 0.5 s budget + one step + saving
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    fresh = ToyTask()
    fresh.load_state_dict(state["task"])
    assert torch.equal(weights(fresh), weights(task))
    assert json.loads((tmp_path / "history.json").read_text())["stopped"] == "time_budget"


def test_early_stopping_keeps_best_weights(tmp_path):
    task = ToyTask(metrics=[0.1, 0.5, 0.4, 0.3, 0.2, 0.9, 0.9])
    snapshots = []
    original = task.validate

    def validate():
        snapshots.append(weights(task).clone())
        return original()

    task.validate = validate
    hist = train(task, toy_batches(), out_dir=tmp_path, epochs=7, monitor="score",
                 patience=3, progress=False)
    assert hist.stopped == "early_stopping"
    assert len(hist.epochs) == 5  # best at 2, then 3 epochs without improvement
    assert hist.best_epoch == 2 and hist.best_value == pytest.approx(0.5)
    assert torch.equal(weights(task), snapshots[1])  # restored to the best epoch
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 2


def test_monitor_unknown_and_bad_arguments(tmp_path):
    with pytest.raises(KeyError, match="nope"):
        train(ToyTask(), toy_batches(), out_dir=tmp_path, epochs=1, monitor="nope",
              progress=False)
    with pytest.raises(ValueError, match="patience needs a monitor"):
        train(ToyTask(), toy_batches(), out_dir=tmp_path, epochs=1, patience=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(ToyTask(), toy_batches(), out_dir=tmp_path / "new", epochs=1, resume=True)
    train(ToyTask(), toy_batches(), out_dir=tmp_path / "s", epochs=1, seed=3, progress=False)
    with pytest.raises(ValueError, match="seed 3"):
        train(ToyTask(), toy_batches(), out_dir=tmp_path / "s", epochs=2, seed=4, resume=True)


def test_segmentation_loss_ignores_void_and_dice_adds():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    masked = target.clone()
    masked[:, :2] = IGNORE
    changed = logits.clone()
    changed[:, :, :2] += 50 * torch.randn(2, 3, 2, 5)  # only ignored pixels change
    assert torch.allclose(segmentation_loss(logits, masked), segmentation_loss(changed, masked))
    assert not torch.allclose(segmentation_loss(logits, target),
                              segmentation_loss(changed, target))
    ce = segmentation_loss(logits, target)
    both = segmentation_loss(logits, target, dice_weight=1.0)
    assert both > ce
    all_void = torch.full_like(target, IGNORE)
    zero = segmentation_loss(logits.requires_grad_(), all_void)
    assert float(zero.detach()) == 0.0
    zero.backward()  # still differentiable


def test_validation_scores_use_the_harness_counts():
    truth = np.array([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    scores = validation_scores([(pred, truth)], 3)
    np.testing.assert_allclose(scores["miou"], np.mean([1 / 3, 3 / 4, 1 / 2]))
    np.testing.assert_allclose(scores["pixel_accuracy"], 5 / 7)
    # a class absent from truth and prediction does not count; two classes give fg_iou
    two = validation_scores([(pred * 0, truth * 0)], 2)
    assert two["miou"] == 1.0 and two["fg_iou"] == 0.0
    # a predicted id the network has no class for is an error, never a match
    wrong = validation_scores([(pred + 5, truth)], 3)
    assert wrong["miou"] == 0.0 and wrong["pixel_accuracy"] == 0.0
    with pytest.raises(ValueError, match="outside the network's 3 classes"):
        validation_scores([(pred, truth + 3)], 3)


def test_augment_pair_keeps_image_and_target_aligned():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (40, 60)).astype(np.int32)
    image = np.stack([target * 60, target * 10, np.zeros_like(target)], -1).astype(np.uint8)
    for seed in range(6):
        img, tgt = augment_pair(image, target, rng=np.random.default_rng(seed), crop_size=48,
                                scale_range=(1.0, 1.0), hflip=True, color_jitter=0.0)
        assert img.shape == (48, 48, 3) and tgt.shape == (48, 48)
        valid = tgt != IGNORE
        assert valid.sum() > 0
        np.testing.assert_array_equal(img[..., 0][valid], (tgt[valid] * 60).astype(np.uint8))
        assert (img[~valid] == 0).all()  # padding: black image, void target
    a = augment_pair(image, target, rng=np.random.default_rng(3), crop_size=32)
    b = augment_pair(image, target, rng=np.random.default_rng(3), crop_size=32)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    before = image.copy()
    augment_pair(image, target, rng=np.random.default_rng(1), crop_size=32, color_jitter=0.5)
    np.testing.assert_array_equal(image, before)
    assert set(np.unique(resize_labels(target, (13, 17)))) <= set(np.unique(target))


def test_batch_maker_is_deterministic_and_start_skips():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(7)]
    targets = [rng.integers(0, 3, (30, 40)).astype(np.int32) for _ in range(7)]
    loaded = []

    def load_pair(i):
        loaded.append(i)
        return images[i], targets[i]

    ds = SegmentationTrainingSet(load_pair, 7, crop_size=24, seed=4)
    maker = make_batch_maker(ds, batch_size=2, seed=4)
    assert maker.steps_per_epoch == 3
    full = list(maker(1))
    again = list(maker(1))
    assert len(full) == 3 and full[0][0].shape == (2, 3, 24, 24) and full[0][1].dtype == torch.int64
    for (x1, y1), (x2, y2) in zip(full, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    loaded.clear()
    tail = list(maker(1, start=2))
    assert len(loaded) == 2  # only the last batch was loaded
    assert torch.equal(tail[0][0], full[2][0])
    other = list(maker(2))
    assert not torch.equal(other[0][0], full[0][0])


def test_segmentation_task_learns_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)

    def load_pair(i):
        r = np.random.default_rng(i)
        target = np.zeros((32, 32), np.int32)
        y, x = r.integers(4, 16, 2)
        target[y:y + 12, x:x + 12] = 1
        image = np.repeat(np.where(target[..., None] == 1, 200, 40), 3, axis=2).astype(np.uint8)
        image = np.clip(image + r.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        return image, target

    class Scale(nn.Module):
        def forward(self, x):
            return (x - 128.0) / 64.0

    torch.manual_seed(0)
    model = nn.Sequential(Scale(), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    ds = SegmentationTrainingSet(load_pair, 8, crop_size=32, scale_range=(1, 1), seed=0)
    maker = make_batch_maker(ds, batch_size=4, seed=0)

    def validator(m):
        pairs = []
        for i in range(8):
            image, target = load_pair(i)
            with torch.inference_mode():
                x = torch.from_numpy(image.transpose(2, 0, 1)).float()[None]
                pairs.append((m(x).argmax(1)[0].numpy(), target))
        return validation_scores(pairs, 2)

    task = SegmentationTask(model, lr=0.05, total_steps=16, validator=validator, device="cpu")
    hist = train(task, maker, out_dir=tmp_path, epochs=8, progress=False, monitor="miou")
    assert hist.best_value > 0.9
    assert hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    del rng
