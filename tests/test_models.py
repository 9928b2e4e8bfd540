"""Segmentation networks (unsup.nn.networks): shapes for any input size, padding does not leak,
the three decoders train, probabilities are valid. Uses a small stand-in encoder (fast);
one test builds the real EfficientNet-Lite0 network."""

import numpy as np
import pytest
import torch
from torch import nn

from unsup.nn.networks import DECODERS, Segmenter, build_segmenter, predict_probabilities


class TinyEncoder(nn.Module):
    """Stand-in with the backbone API: maps at strides 4/8/16/32 (tests only)."""

    strides = (4, 8, 16, 32)
    channels = (8, 12, 16, 24)
    pad_multiple = 32

    def __init__(self):
        super().__init__()
        chans = (3,) + self.channels
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=4 if i == 0 else 2,
                                    padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU())
            for i in range(4))

    def normalize(self, x):
        return (x - 127.0) / 128.0

    def forward(self, x):
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("size", [(64, 64), (37, 53), (1, 5)])
def test_output_shape_any_input_size(decoder, size):
    torch.manual_seed(0)
    model = Segmenter(TinyEncoder(), decoder, 3).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, *size) * 255)
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_padding_is_cropped_back_consistently():
    # the top-left part of the output for an input padded by the model itself equals the
    # output for the same content: the model crops exactly what it padded
    torch.manual_seed(0)
    model = Segmenter(TinyEncoder(), "unet", 2).eval()
    x = torch.rand(1, 3, 50, 70) * 255
    with torch.inference_mode():
        out = model(x)
        padded = torch.nn.functional.pad(model.encoder.normalize(x), (0, 26, 0, 14),
                                         mode="reflect")
        ref = model.decoder(model.encoder(padded), padded.shape[-2:])[..., :50, :70]
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_learn_a_simple_task(decoder):
    torch.manual_seed(0)
    model = Segmenter(TinyEncoder(), decoder, 2, freeze_encoder_bn=False)
    gen = torch.Generator().manual_seed(0)
    target = torch.zeros(4, 64, 64, dtype=torch.long)
    for i in range(4):
        y, x = torch.randint(0, 32, (2,), generator=gen)
        target[i, y:y + 32, x:x + 32] = 1
    images = torch.where(target[:, None].bool(), 220.0, 30.0).expand(-1, 3, -1, -1).clone()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # recalibrate the BatchNorm running statistics on the final weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for _ in range(3):
            model(images)
    model.eval()
    with torch.inference_mode():
        pred = model(images).argmax(1)
    acc = (pred == target).float().mean().item()
    assert acc > 0.93, acc


def test_frozen_encoder_batchnorm_stays_in_eval_mode():
    model = Segmenter(TinyEncoder(), "fcn", 2, freeze_encoder_bn=True).train()
    enc_bn = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    dec_bn = [m for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert enc_bn and not any(m.training for m in enc_bn)
    assert dec_bn and all(m.training for m in dec_bn)
    before = enc_bn[0].running_mean.clone()
    model(torch.rand(2, 3, 32, 32) * 255)
    assert torch.equal(before, enc_bn[0].running_mean)


def test_predict_probabilities_full_resolution_and_normalised():
    torch.manual_seed(0)
    model = Segmenter(TinyEncoder(), "deeplab", 4)
    image = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    probs = predict_probabilities(model, image, max_side=64, flip=True)
    assert probs.shape == (4, 90, 130) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert model.training  # mode restored


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown decoder"):
        Segmenter(TinyEncoder(), "segformer", 2)
    with pytest.raises(ValueError, match="n_classes"):
        Segmenter(TinyEncoder(), "fcn", 1)
    with pytest.raises(ValueError, match="unknown decoder"):
        build_segmenter("pspnet", 2)


def test_build_segmenter_real_backbone():
    torch.manual_seed(0)
    model = build_segmenter("fcn", 3, pretrained=False).eval()
    assert model.encoder.name == "efficientnet-lite0"
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 40, 60) * 255)
    assert out.shape == (1, 3, 40, 60)
    pretrained = build_segmenter("fcn", 3, pretrained=True)
    a = dict(model.encoder.named_parameters())
    b = dict(pretrained.encoder.named_parameters())
    assert not torch.equal(a["stem.0.weight"], b["stem.0.weight"])
