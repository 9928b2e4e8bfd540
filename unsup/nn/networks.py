"""Segmentation networks: a pretrained multi-scale encoder plus one of three decoders.

All decoders take the encoder's maps at strides 4, 8, 16 and 32 (:mod:`unsup.backbones`,
EfficientNet-Lite0 with ImageNet weights by default) and return class logits at the input
resolution:

``fcn``
    FCN-8s style (Long, Shelhamer & Darrell, CVPR 2015): class scores from the stride-32
    features (after one 3x3 conv), upsampled and summed with 1x1 "score" layers of the
    stride-16 and stride-8 maps, then bilinearly upsampled x8. Bilinear upsampling replaces
    FCN's learned deconvolutions (FCN initialises them to bilinear anyway).
``unet``
    U-Net style (Ronneberger et al., MICCAI 2015): from stride 32 up to stride 4, each level
    upsamples x2, concatenates the encoder map of that stride and applies two 3x3
    conv-BN-ReLU; a 1x1 classifier at stride 4, upsampled x4.
``deeplab``
    DeepLabv3 ASPP head (Chen et al., arXiv 1706.05587): the stride-32 map is upsampled and
    concatenated with the stride-16 map (the encoder has no dilation, so this gives the
    output stride 16 of DeepLabv3), then ASPP = a 1x1 branch, three 3x3 atrous branches
    (rates 6, 12, 18) and image pooling; plus the DeepLabv3+ decoder (Chen et al., ECCV 2018):
    the ASPP output is upsampled to stride 4 and fused with the (1x1-reduced) stride-4
    features by two 3x3 convs.

Inputs are float tensors of RGB values 0..255, shape (N, 3, H, W), any H and W: the model
normalises them for its encoder, pads them (reflection) to a multiple of 32 and crops the
logits back. :func:`predict_probabilities` runs a model on one uint8 image under
``torch.inference_mode()`` (GPU when available).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DECODERS", "Segmenter", "build_segmenter", "predict_probabilities",
           "FCNDecoder", "UNetDecoder", "DeepLabDecoder"]

DECODERS = ("fcn", "unet", "deeplab")


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FCNDecoder(nn.Module):
    """FCN-8s style skip decoder (see the module docstring)."""

    def __init__(self, channels, n_classes: int, *, width: int = 256, dropout: float = 0.1):
        super().__init__()
        c4, c8, c16, c32 = channels
        self.head32 = nn.Sequential(_conv_bn_relu(c32, width), nn.Dropout2d(dropout),
                                    nn.Conv2d(width, n_classes, 1))
        self.score16 = nn.Conv2d(c16, n_classes, 1)
        self.score8 = nn.Conv2d(c8, n_classes, 1)
        # FCN zero-initialises the skip score layers so training starts from FCN-32s
        for layer in (self.score16, self.score8):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, feats, size):
        _, f8, f16, f32 = feats
        s = self.head32(f32)
        s = _up(s, f16.shape[-2:]) + self.score16(f16)
        s = _up(s, f8.shape[-2:]) + self.score8(f8)
        return _up(s, size)


class UNetDecoder(nn.Module):
    """U-Net style decoder from stride 32 to stride 4 (see the module docstring)."""

    def __init__(self, channels, n_classes: int, *, widths=(192, 96, 48)):
        super().__init__()
        c4, c8, c16, c32 = channels
        w16, w8, w4 = widths
        self.up16 = nn.Sequential(_conv_bn_relu(c32 + c16, w16), _conv_bn_relu(w16, w16))
        self.up8 = nn.Sequential(_conv_bn_relu(w16 + c8, w8), _conv_bn_relu(w8, w8))
        self.up4 = nn.Sequential(_conv_bn_relu(w8 + c4, w4), _conv_bn_relu(w4, w4))
        self.classifier = nn.Conv2d(w4, n_classes, 1)

    def forward(self, feats, size):
        f4, f8, f16, f32 = feats
        x = self.up16(torch.cat([_up(f32, f16.shape[-2:]), f16], 1))
        x = self.up8(torch.cat([_up(x, f8.shape[-2:]), f8], 1))
        x = self.up4(torch.cat([_up(x, f4.shape[-2:]), f4], 1))
        return _up(self.classifier(x), size)


class _ImagePooling(nn.Module):
    # no BatchNorm: a 1x1 map with a batch of one would make BN undefined in training
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class DeepLabDecoder(nn.Module):
    """ASPP at stride 16 plus the DeepLabv3+ stride-4 fusion (see the module docstring)."""

    def __init__(self, channels, n_classes: int, *, width: int = 192, rates=(6, 12, 18),
                 low_level: int = 48, dropout: float = 0.1):
        super().__init__()
        c4, c8, c16, c32 = channels
        cin = c16 + c32
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, width, kernel=1)]
            + [_conv_bn_relu(cin, width, dilation=r) for r in rates]
            + [_ImagePooling(cin, width)])
        self.project = nn.Sequential(_conv_bn_relu(width * (len(rates) + 2), width, kernel=1),
                                     nn.Dropout2d(dropout))
        self.reduce4 = _conv_bn_relu(c4, low_level, kernel=1)
        self.fuse = nn.Sequential(_conv_bn_relu(width + low_level, width),
                                  _conv_bn_relu(width, width))
        self.classifier = nn.Conv2d(width, n_classes, 1)

    def forward(self, feats, size):
        f4, _, f16, f32 = feats
        x = torch.cat([f16, _up(f32, f16.shape[-2:])], 1)
        x = self.project(torch.cat([b(x) for b in self.branches], 1))
        x = self.fuse(torch.cat([_up(x, f4.shape[-2:]), self.reduce4(f4)], 1))
        return _up(self.classifier(x), size)


_DECODER_CLASSES = {"fcn": FCNDecoder, "unet": UNetDecoder, "deeplab": DeepLabDecoder}


class Segmenter(nn.Module):
    """Encoder + decoder; ``forward(images 0..255 (N, 3, H, W)) -> logits (N, C, H, W)``.

    Parameters
    ----------
    encoder : unsup.backbones.Encoder
        With ``strides == (4, 8, 16, 32)``, ``channels``, ``normalize`` and ``pad_multiple``.
    decoder : {"fcn", "unet", "deeplab"}
    n_classes : int
    freeze_encoder_bn : bool
        Keep the encoder's BatchNorm layers in eval mode (ImageNet statistics) while
        training: the small batches of CPU training give unreliable batch statistics.
    """

    def __init__(self, encoder, decoder: str, n_classes: int, *, freeze_encoder_bn: bool = True):
        super().__init__()
        if decoder not in _DECODER_CLASSES:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        if tuple(encoder.strides) != (4, 8, 16, 32):
            raise ValueError(f"the decoders need encoder maps at strides (4, 8, 16, 32), "
                             f"got {tuple(encoder.strides)}")
        if int(n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.encoder = encoder
        self.decoder = _DECODER_CLASSES[decoder](tuple(encoder.channels), int(n_classes))
        self.decoder_name = decoder
        self.n_classes = int(n_classes)
        self.freeze_encoder_bn = freeze_encoder_bn

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_encoder_bn:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        m = int(getattr(self.encoder, "pad_multiple", 32))
        ph, pw = (-h) % m, (-w) % m
        x = self.encoder.normalize(images)
        if ph or pw:
            # reflection needs pad < size; replicate covers tiny inputs
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        logits = self.decoder(self.encoder(x), x.shape[-2:])
        return logits[..., :h, :w]


def build_segmenter(decoder: str = "unet", n_classes: int = 2, *,
                    backbone: str = "efficientnet-lite0", pretrained: bool = True,
                    weights_path=None, freeze_encoder_bn: bool = True) -> Segmenter:
    """Build a segmentation network.

    Parameters
    ----------
    decoder : {"fcn", "unet", "deeplab"}
    n_classes : int
        Output classes (background included).
    backbone : str
        A name accepted by :func:`unsup.backbones.build_encoder`.
    pretrained : bool
        ImageNet weights for the encoder (False: random initialisation).
    weights_path : path-like, optional
        Encoder weights file (required for ``torchvision:`` / ``timm:`` backbones).
    freeze_encoder_bn : bool
        See :class:`Segmenter`.
    """
    from unsup.backbones import build_encoder

    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if not pretrained:
        if weights_path is not None:
            raise ValueError("pretrained=False contradicts weights_path")
        weights_path = "none"
    encoder = build_encoder(backbone, weights_path=weights_path, strides=(4, 8, 16, 32))
    return Segmenter(encoder, decoder, n_classes, freeze_encoder_bn=freeze_encoder_bn)


def predict_probabilities(model: nn.Module, image: np.ndarray, *, max_side: int | None = None,
                          flip: bool = False, device=None) -> np.ndarray:
    """Class probabilities (C, H, W) float32 of one RGB uint8 image.

    The image is resized (area interpolation) so that its longer side is at most
    ``max_side``, run through ``model`` (eval mode, ``torch.inference_mode()``), optionally
    averaged with the prediction of its mirror image (``flip``), and the probabilities are
    bilinearly resized back to the full resolution.
    """
    from unsup.augment import resize_image

    h, w = image.shape[:2]
    if device is None:
        device = next(model.parameters()).device
    work = image
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        work = resize_image(image, (max(1, round(h * scale)), max(1, round(w * scale))))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(work.transpose(2, 0, 1))).float()[None]
            x = x.to(device)
            probs = torch.softmax(model(x).float(), dim=1)
            if flip:
                probs = 0.5 * (probs + torch.softmax(model(x.flip(-1)).float(), 1).flip(-1))
            if probs.shape[-2:] != (h, w):
                probs = _up(probs, (h, w))
            probs = probs[0].clamp_min_(0)
            probs = probs / probs.sum(0, keepdim=True).clamp_min_(1e-12)
            return probs.cpu().numpy().astype(np.float32)
    finally:
        model.train(was_training)
