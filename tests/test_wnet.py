"""Tests of the W-Net method (methods/wnet.py): loss, network, training, persistence."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from methods.wnet import (
    DEFAULT_MODEL_DIR,
    WNet,
    build_wnet,
    ncut_offsets,
    soft_ncut_loss,
)
from unsup.base import NotFittedError, RunOptions, params_to_json
from unsup.registry import create_method, load_method


@dataclass
class _Sample:
    image: np.ndarray


def _dense_soft_ncut(probs, image, radius, sigma_i, sigma_x, mask=None):
    """The paper's Eq. 3 with an explicit N x N affinity matrix (tiny images only)."""
    b, k, h, w = probs.shape
    out = []
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    positions = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).to(probs.dtype)
    dist2 = ((positions[:, None] - positions[None]) ** 2).sum(-1)
    for n in range(b):
        brightness = image[n].mean(0).reshape(-1)
        affinity = (torch.exp(-(brightness[:, None] - brightness[None]) ** 2 / sigma_i ** 2)
                    * torch.exp(-dist2 / sigma_x ** 2) * (dist2.sqrt() < radius))
        p = probs[n].reshape(k, -1)
        if mask is not None:
            m = mask[n].reshape(-1).to(probs.dtype)
            affinity = affinity * m[:, None] * m[None]
            p = p * m
        assoc_aa = torch.einsum("ki,ij,kj->k", p, affinity, p)
        assoc_av = p @ affinity.sum(1)
        out.append(k - (assoc_aa / assoc_av).sum())
    return torch.stack(out)


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_soft_ncut_matches_dense_computation(radius, one_thread):
    gen = torch.Generator().manual_seed(radius)
    probs = torch.softmax(torch.randn(2, 4, 9, 11, generator=gen, dtype=torch.float64), 1)
    image = torch.rand(2, 3, 9, 11, generator=gen, dtype=torch.float64) * 80
    mask = torch.rand(2, 1, 9, 11, generator=gen) > 0.25
    for m in (None, mask):
        local = soft_ncut_loss(probs, image, radius=radius, sigma_i=10.0, sigma_x=4.0, mask=m,
                               reduction="none")
        dense = _dense_soft_ncut(probs, image, radius, 10.0, 4.0, mask=m)
        torch.testing.assert_close(local, dense, atol=1e-5, rtol=0)
    # float32 agrees too
    local32 = soft_ncut_loss(probs.float(), image.float(), radius=radius, reduction="none")
    torch.testing.assert_close(local32.double(), _dense_soft_ncut(probs, image, radius, 10., 4.),
                               atol=1e-5, rtol=0)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(previous)


def test_soft_ncut_gradcheck(one_thread):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    image = torch.rand(2, 3, 5, 6, generator=gen, dtype=torch.float64) * 40
    mask = torch.rand(2, 5, 6, generator=gen) > 0.2
    assert torch.autograd.gradcheck(
        lambda z: soft_ncut_loss(torch.softmax(z, 1), image, radius=3, mask=mask,
                                 reduction="none"), (logits,))


def test_soft_ncut_known_values():
    # uniform probabilities: every class has ratio 1/K, so the loss is K - 1
    image = torch.rand(1, 3, 12, 12) * 255
    uniform = torch.full((1, 5, 12, 12), 0.2)
    assert soft_ncut_loss(uniform, image).item() == pytest.approx(4.0, abs=1e-5)
    # a hard partition along a strong brightness edge has (almost) no cut: loss ~ 0
    labels = (torch.arange(12)[None, :] >= 6).long().expand(12, 12)
    edge_image = (labels * 200.0)[None, None].expand(1, 3, 12, 12)
    hard = torch.nn.functional.one_hot(labels, 2).permute(2, 0, 1)[None].double()
    assert soft_ncut_loss(hard, edge_image.double()).item() < 1e-12
    # the same partition across a flat image cuts many affinities
    flat_image = torch.full((1, 3, 12, 12), 100.0, dtype=torch.float64)
    assert soft_ncut_loss(hard, flat_image).item() > 0.1
    assert len(ncut_offsets(5)) == 69  # (dy, dx) with dy^2 + dx^2 < 25
    # every unused class costs 1: the same 2-region partition with K = 5 classes gives ~3,
    # which is why K sets the number of regions training aims for (docs/benchmarks/wnet.md)
    hard5 = torch.zeros((1, 5, 12, 12), dtype=torch.float64)
    hard5[:, :2] = hard
    assert soft_ncut_loss(hard5, edge_image.double()).item() == pytest.approx(3.0, abs=1e-9)


def test_network_architecture(one_thread):
    model = build_wnet(5, width=4, dropout=0.2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    depthwise = [m for m in convs if m.groups > 1]
    # 18 modules x 2 convolutions; 14 inner modules depthwise-separable
    assert len(convs) - len(depthwise) == 4 * 2 + 0 and len(depthwise) == 14 * 2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 36
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 18
    x = torch.randn(2, 3, 32, 48)
    probs, recon = model(x)
    assert probs.shape == (2, 5, 32, 48) and recon.shape == (2, 3, 32, 48)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 32, 48))
    assert max(m.out_channels for m in convs) == 4 * 16  # width x 16 at the bottleneck


def test_training_step_is_two_separate_minimisations(one_thread):
    """Algorithm 1 of the paper: an n-cut step on U-Enc, then a reconstruction step on the
    whole W-Net, each with its own Adam state. A single Adam shared by both steps (the
    session-1 bug) mixes the two losses' moment estimates and fails this from the 2nd batch."""
    import copy

    from methods.wnet import WNetTask, normalize_images

    torch.manual_seed(0)
    model = build_wnet(3, width=4, dropout=0.0)
    reference = copy.deepcopy(model)
    task = WNetTask(model, epochs=2, lr=0.01, ncut_weight=1.0, radius=3, sigma_i=10.0,
                    sigma_x=4.0, device="cpu")
    gen = torch.Generator().manual_seed(1)
    batches = [((torch.rand(2, 3, 32, 32, generator=gen) * 255).to(torch.uint8),
                torch.ones(2, 32, 32, dtype=torch.bool)) for _ in range(3)]
    for batch in batches:
        task.train_step(batch)

    enc_opt = torch.optim.Adam(reference.encoder.parameters(), lr=0.01)
    all_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    reference.train()
    for images, masks in batches:
        images = images.float()
        x = normalize_images(images)
        enc_opt.zero_grad()
        soft_ncut_loss(reference.segment(x), images, radius=3, mask=masks[:, None]).backward()
        enc_opt.step()
        all_opt.zero_grad()
        _, recon = reference(x)
        ((recon - images / 255.0) ** 2).mean().backward()
        all_opt.step()
    for (name, got), expected in zip(model.state_dict().items(),
                                     reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
    # the n-cut step moves U-Enc only
    assert {id(p) for g in task.ncut_optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in model.encoder.parameters()}


def _quadrants(seed, size=48):
    """Three flat regions (top, bottom-left, bottom-right) in 3 colours of distinct brightness."""
    colors = np.array([[20, 30, 40], [200, 60, 40], [60, 200, 220]])
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(size // 3, 2 * size // 3, size=2)
    labels = np.zeros((size, size), int)
    labels[y0:, :x0] = 1
    labels[y0:, x0:] = 2
    image = colors[rng.permutation(3)][labels] + rng.normal(0, 3, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _matched_miou(pred, truth):
    from scipy.optimize import linear_sum_assignment

    p_ids, p_inv = np.unique(pred, return_inverse=True)
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    cm = np.bincount(t_inv.ravel() * len(p_ids) + p_inv.ravel(),
                     minlength=len(t_ids) * len(p_ids)).reshape(len(t_ids), len(p_ids))
    iou = cm / (cm.sum(1)[:, None] + cm.sum(0)[None] - cm)
    rows, cols = linear_sum_assignment(-iou)
    return iou[rows, cols].sum() / len(t_ids)


NETWORK_OPTIONS = ("width", "crop_size", "batch_size", "epochs", "lr", "dropout")


def _tiny(**params):
    """A small W-Net; network options given by their short names (width=4)."""
    defaults = dict(n_classes=4, width=4, crop_size=48, batch_size=3, epochs=20, lr=0.01,
                    dropout=0.0, pretrained=False, n_threads=1, seed=0)
    defaults.update(params)
    return create_method("wnet", **{f"network__{k}" if k in NETWORK_OPTIONS else k: v
                                    for k, v in defaults.items()})


def test_short_training_lowers_ncut_and_recovers_regions(tmp_path):
    data = [_quadrants(s) for s in range(18)]
    method = _tiny(epochs=10).fit([_Sample(im) for im, _ in data], run=RunOptions(out_dir=tmp_path))
    import json

    history = json.loads((tmp_path / "history.json").read_text())
    ncut = [e["ncut"] for e in history["epochs"]]
    recon = [e["reconstruction"] for e in history["epochs"]]
    assert len(ncut) == 10 and (tmp_path / "curves.png").is_file()
    assert np.mean(ncut[-3:]) < 0.6 * np.mean(ncut[:2])
    assert np.mean(recon[-3:]) < 0.5 * recon[0]
    train_miou = [_matched_miou(method.predict(im).labels, gt) for im, gt in data]
    held_out = [_quadrants(100 + s) for s in range(4)]
    test_miou = [_matched_miou(method.predict(im).labels, gt) for im, gt in held_out]
    # matched mIoU (Hungarian matching of labels to regions) of the argmax
    assert np.mean(train_miou) > 0.9 and np.mean(test_miou) > 0.9


def test_save_load_and_resume_give_identical_results(tmp_path):
    data = [_Sample(_quadrants(s, size=32)[0]) for s in range(4)]
    image = _quadrants(50, size=37)[0]  # not a multiple of the stride
    straight = _tiny(crop_size=32, batch_size=2, epochs=2, dropout=0.2).fit(
        data, run=RunOptions(out_dir=tmp_path / "a"))
    # interrupted by the time budget after its first step, then resumed
    first = _tiny(crop_size=32, batch_size=2, epochs=2, dropout=0.2).fit(
        data, run=RunOptions(out_dir=tmp_path / "b", max_minutes=1e-4))
    assert first.training_["stopped"] == "time_budget"
    resumed = _tiny(crop_size=32, batch_size=2, epochs=2, dropout=0.2).fit(
        data, run=RunOptions(out_dir=tmp_path / "b", resume=True))
    assert resumed.training_["epochs_done"] == 2
    expected = straight.predict(image)
    np.testing.assert_array_equal(resumed.predict(image).scores, expected.scores)
    straight.save(tmp_path / "model")
    reloaded = load_method(tmp_path / "model")
    assert isinstance(reloaded, WNet)
    assert params_to_json(reloaded) == params_to_json(straight)
    again = reloaded.predict(image)
    np.testing.assert_array_equal(again.labels, expected.labels)
    np.testing.assert_array_equal(again.scores, expected.scores)
    assert expected.labels.shape == (37, 37) and expected.scores.shape == (4, 37, 37)
    np.testing.assert_allclose(expected.scores.sum(0), 1.0, atol=1e-5)


def test_max_minutes_stops_in_time(tmp_path):
    import time

    data = [_Sample(_quadrants(s, size=32)[0]) for s in range(4)]
    t0 = time.monotonic()
    method = _tiny(crop_size=32, batch_size=1, epochs=1000).fit(data, run=RunOptions(out_dir=tmp_path,
                                                                 max_minutes=0.03))
    elapsed = time.monotonic() - t0
    assert method.training_["stopped"] == "time_budget"
    assert elapsed < 0.03 * 60 + 15  # the budget plus one step, caching and checkpointing
    assert method.predict(data[0].image).labels.shape == (32, 32)


def test_shipped_default_model():
    assert (DEFAULT_MODEL_DIR / "weights.pt").is_file(), "the default W-Net weights must ship"
    method = create_method("wnet")
    assert method.is_fitted(), (
        "the shipped model (methods/weights/wnet_default/model.json) must have the default "
        "n_classes, width and max_side; train and install one with "
        "scripts/train_wnet_default.py --install")
    info = method.default_model_info()
    assert info["shipped"] and "weights.pt" in info["sha256"]
    image = _quadrants(3, size=40)[0]
    seg = method.predict(image)
    assert seg.labels.shape == (40, 40) and seg.scores.shape[0] == method.n_classes
    # other architecture parameters: the shipped weights do not apply
    other = create_method("wnet", n_classes=method.n_classes + 1)
    assert not other.is_fitted() and other.default_model_info() is None
    with pytest.raises(NotFittedError):
        other.predict(image)
    assert not create_method("wnet", pretrained=False).is_fitted()


def test_predict_does_not_mutate_and_checks_params():
    method = _tiny(epochs=1)
    method.fit([_Sample(_quadrants(0, size=48)[0])])
    image = _quadrants(1, size=48)[0]
    copy = image.copy()
    method.predict(image)
    np.testing.assert_array_equal(image, copy)
    with pytest.raises(ValueError, match="RGB"):
        method.predict(image[..., 0])
    for bad in (dict(n_classes=1), dict(crop_size=50), dict(dropout=1.0), dict(sigma_i=0),
                dict(ncut_weight=-1)):
        with pytest.raises(ValueError, match="wnet"):
            _tiny(**bad).fit([_Sample(image)])
    with pytest.raises(ValueError, match="no image"):
        _tiny().fit([])
