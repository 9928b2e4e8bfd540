"""Reading images and label maps, writing label maps and overlays.

Every writer goes through a temporary file in the destination folder followed by an atomic
``os.replace``, so a killed run never leaves a truncated output behind.

Conventions of :func:`read_image` (documented because they change pixel values):

- EXIF orientation is applied, so the returned array is the image as a viewer shows it.
- 16-bit data (gray ``I;16`` PNG/TIFF, 16-bit RGB TIFF) is mapped linearly to 8 bits with
  ``round(v / 257)`` (65535 -> 255); 32-bit integer images are treated as 16-bit if their
  values fit, float images are scaled by their maximum if it exceeds 1, else by 255.
- Alpha is composited over a white background (as ``skimage.color.rgba2rgb`` does), so fully
  transparent pixels do not expose whatever colour the encoder stored under them.
- Gray, 1-bit, palette, CMYK and YCbCr images are converted to RGB.
"""

from __future__ import annotations

import colorsys
import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageReadError",
    "IMAGE_EXTENSIONS",
    "read_image",
    "read_label_map",
    "write_label_map",
    "write_image",
    "write_ultrametric_map",
    "write_overlay",
    "overlay",
    "label_colors",
    "atomic_write_path",
    "atomic_write_bytes",
    "frame_count",
    "read_torch_state",
    "read_json",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
#: Images above this many pixels are refused (decompression bombs, absurd inputs).
MAX_PIXELS = 200_000_000


class ImageReadError(ValueError):
    """An input file could not be used as an image; the message names the file and why."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ---------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path`` atomically.

    On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write_path(path) as tmp:
        Path(tmp).write_bytes(data)


# ---------------------------------------------------------------------------------------------
# reading


def _check_size(path: Path, width: int, height: int) -> None:
    """Refuse an image by the size its header declares, before any pixel is decoded.

    Every decoder path calls this first, so the pixel limit cannot be bypassed by a format
    that one library reads and the other does not.
    """
    if width < 1 or height < 1:
        raise ImageReadError(path, f"image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            path, f"image is {width}x{height} = {width * height} pixels, above the "
            f"limit of {MAX_PIXELS} (unsup.io.MAX_PIXELS)"
        )


def _open_checked(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            _check_size(path, *img.size)
            img.load()
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format (or the file is corrupt)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image data ({exc})") from None
    return img


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = int(array.max()) if array.size else 0
        if top <= 255 and array.dtype.itemsize == 1:
            return array.astype(np.uint8)
        # 16-bit data (and 32-bit data holding 16-bit values) -> 8 bits
        scale = 257.0 if top <= 65535 else float(np.iinfo(array.dtype).max) / 255.0
        return np.clip(np.round(array.astype(np.float64) / scale), 0, 255).astype(np.uint8)
    array = array.astype(np.float64)
    top = float(np.nanmax(array)) if array.size else 0.0
    array = array * 255.0 if top <= 1.0 else array * (255.0 / top)
    return np.clip(np.round(np.nan_to_num(array)), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64) / 255.0
        alpha = rgba[..., 3:4]
        rgb = rgba[..., :3] * alpha + (1.0 - alpha)  # over white
        return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _read_tiff_fallback(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            _check_size(path, int(page.imagewidth), int(page.imagelength))
            array = page.asarray()
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile raises many types on bad data
        raise ImageReadError(path, f"corrupt or unsupported TIFF ({exc})") from None
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageReadError(path, f"unsupported TIFF layout {array.shape}")
    rgb = _to_uint8(array[..., :3])
    if array.shape[2] == 4:
        alpha = _to_uint8(array[..., 3:4]).astype(np.float64) / 255.0
        rgb = np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return rgb


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8, oriented as its EXIF tag says.

    Parameters
    ----------
    path : path-like
        JPEG, PNG (8/16-bit, palette, gray, RGBA), TIFF, BMP, WebP or GIF file (first
        frame of an animation).

    Returns
    -------
    image : ndarray of uint8, shape (H, W, 3)

    Raises
    ------
    ImageReadError
        The file is missing, empty, not an image, corrupt, truncated, has no pixels or is
        absurdly large. The message names the file and the problem.
    """
    path = Path(path)
    try:
        img = _open_checked(path)
    except ImageReadError:
        if path.suffix.lower() in (".tif", ".tiff") and path.is_file() and path.stat().st_size:
            return _read_tiff_fallback(path)
        raise
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF blocks raise assorted errors
        raise ImageReadError(path, f"unreadable EXIF orientation ({exc})") from None
    if path.suffix.lower() in (".tif", ".tiff") and img.mode not in (
        "1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I;16B", "I;16L", "I", "F", "CMYK", "YCbCr"
    ):
        return _read_tiff_fallback(path)
    image = _pil_to_rgb(img)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageReadError(path, f"image has no pixels ({image.shape[1]}x{image.shape[0]})")
    return np.ascontiguousarray(image)


def frame_count(path: str | os.PathLike) -> int:
    """Number of frames (pages) of an image file; :func:`read_image` uses the first only.

    Reads the header and frame index, not the pixels; 1 for files PIL cannot open.
    """
    try:
        with Image.open(path) as img:
            return int(getattr(img, "n_frames", 1))
    except (OSError, SyntaxError, ValueError):
        return 1


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a label-map image (indexed/gray PNG or TIFF) as int32 labels, values unchanged.

    Palette PNGs give their palette indices (the VOC convention), gray images their gray
    values, 16-bit images their 16-bit values. RGB images are accepted only when the three
    channels are equal.

    Raises
    ------
    ImageReadError
        For unreadable files and colour-coded (non-gray RGB) label images.
    """
    path = Path(path)
    img = _open_checked(path)
    if img.mode in ("P", "L", "I;16", "I;16B", "I;16L", "I", "1"):
        labels = np.asarray(img)
    elif img.mode in ("RGB", "RGBA", "LA"):
        arr = np.asarray(img)
        if img.mode == "LA":
            labels = arr[..., 0]
        elif np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            labels = arr[..., 0]
        else:
            raise ImageReadError(
                path, "label map is a colour image; save labels as an indexed (palette) or "
                "gray PNG whose values are the label ids"
            )
    else:
        raise ImageReadError(path, f"unsupported label-map image mode {img.mode!r}")
    return np.asarray(labels).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# writing


def write_label_map(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write labels as a PNG: uint8 when all labels are < 256, else uint16.

    Raises
    ------
    ValueError
        If labels are negative, not 2-D, or do not fit in 16 bits.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    top = int(labels.max()) if labels.size else 0
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative to be stored as PNG")
    if top > 65535:
        raise ValueError(f"labels go up to {top}; PNG label maps hold at most 65535")
    if top < 256:
        img = Image.fromarray(labels.astype(np.uint8), mode="L")
    else:
        img = Image.fromarray(labels.astype(np.uint16))  # mode I;16
    _save_pil_atomic(img, path)


def write_ultrametric_map(path: str | os.PathLike, ucm: np.ndarray) -> None:
    """Write an ultrametric contour map as a 16-bit PNG (0 = no boundary), atomically."""
    ucm = np.asarray(ucm)
    if ucm.ndim != 2:
        raise ValueError(f"an ultrametric contour map must be 2-D, got shape {ucm.shape}")
    if ucm.size and (ucm.min() < 0 or ucm.max() > 65535):
        raise ValueError("ultrametric contour map values must lie in 0..65535")
    _save_pil_atomic(Image.fromarray(ucm.astype(np.uint16)), path)


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB (or gray) uint8 image as PNG/JPEG, chosen by the suffix, atomically."""
    _save_pil_atomic(Image.fromarray(np.asarray(image, dtype=np.uint8)), path)


def _save_pil_atomic(img: Image.Image, path) -> None:
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        path.suffix.lower(), "PNG"
    )
    with atomic_write_path(path) as tmp:
        img.save(tmp, format=fmt)


def label_colors(n: int, *, seed: int = 0) -> np.ndarray:
    """A deterministic palette of ``n`` distinct, saturated RGB colours (uint8, shape (n, 3)).

    Hues follow the golden-ratio sequence so neighbouring label ids get far-apart colours.
    """
    golden = 0.618033988749895
    colors = np.empty((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (seed * 0.1 + i * golden) % 1.0
        sat = 0.65 + 0.35 * ((i // 7) % 2)
        val = 0.95 - 0.25 * ((i // 3) % 2)
        colors[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return colors


def overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.45,
            boundary_color=(255, 255, 255)) -> np.ndarray:
    """Blend ``image`` with a colour per label and draw label boundaries.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W, 3)
    labels : ndarray of int, shape (H, W)
    alpha : float
        Weight of the label colours.
    boundary_color : tuple of 3 ints
        Colour of the one-pixel boundaries between labels.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    from skimage.segmentation import find_boundaries

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    colors = label_colors(int(inverse.max()) + 1 if labels.size else 1)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors[inverse].astype(np.float32)
    out = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    out[find_boundaries(labels, mode="inner")] = boundary_color
    return out


def write_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, **kwargs) -> None:
    """Write :func:`overlay` of ``image`` and ``labels`` as a PNG, atomically."""
    write_image(path, overlay(image, labels, **kwargs))


# ---------------------------------------------------------------------------------------------
# JSON and torch state files


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError):
    """Parse a JSON file; invalid JSON or an unreadable file raises ``error`` naming the file.

    The message gives the line of a syntax error, so that a hand-edited file can be fixed.
    """
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable ({exc})") from None


def read_torch_state(path: str | os.PathLike, *, what: str = "weights file") -> dict:
    """Read a torch ``state_dict`` / checkpoint file without unpickling anything else.

    ``torch.load(..., weights_only=True)`` admits tensors and plain containers only; every
    other content, truncation or corruption becomes one :class:`ValueError` naming the file.
    torch's own advice to retry with ``weights_only=False`` is never passed on: that would
    run whatever code the file carries.

    Parameters
    ----------
    path : path-like
    what : str
        How the file is named in messages ("weights file", "checkpoint", ...).

    Returns
    -------
    dict
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} is missing")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: {what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices of the weights-only unpickler
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: {what} holds objects other than tensors and plain "
                         "containers; refused (only plain tensor files are read)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            IndexError, TypeError, AttributeError):
        raise ValueError(f"{path}: {what} is truncated or corrupt (not a torch tensor "
                         "file)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: {what} must hold a dict of tensors, got "
                         f"{type(state).__name__}")
    return state

