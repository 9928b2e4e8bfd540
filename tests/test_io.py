import io as pyio
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import unsup.io as uio
from unsup.io import ImageReadError, read_image, read_label_map, write_label_map


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "webp"])
def test_lossless_formats_round_trip(tmp_path, ext):
    image = _rgb()
    path = tmp_path / f"x.{ext}"
    kwargs = {"lossless": True} if ext == "webp" else {}
    Image.fromarray(image).save(path, **kwargs)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, image)


def test_jpeg_reads_close_to_original(tmp_path):
    image = np.full((16, 24, 3), (200, 40, 90), np.uint8)
    Image.fromarray(image).save(tmp_path / "x.jpg", quality=95)
    out = read_image(tmp_path / "x.jpg")
    assert out.shape == (16, 24, 3)
    assert np.abs(out.astype(int) - image).max() <= 3


def test_gray_and_palette_become_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 2], gray)

    pal = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 255])
    np.testing.assert_array_equal(out[1, 0], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])
    assert read_label_map(tmp_path / "p.png").tolist() == [[0, 1], [1, 2]]


def test_sixteen_bit_gray_png_is_scaled_by_257(tmp_path):
    values = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    out = read_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[..., 1], np.arange(256).reshape(16, 16))


def test_sixteen_bit_rgb_tiff(tmp_path):
    import tifffile

    values = np.zeros((4, 5, 3), np.uint16)
    values[..., 0] = 65535
    values[..., 2] = 257 * 10
    tifffile.imwrite(tmp_path / "c.tif", values)
    out = read_image(tmp_path / "c.tif")
    assert out.shape == (4, 5, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (out[..., 2] == 10).all()


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255          # red everywhere ...
    rgba[0, 0, 3] = 255         # ... opaque here
    rgba[0, 1, 3] = 0           # fully transparent here
    rgba[1, :, 3] = 128         # half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert abs(int(out[1, 0, 1]) - 127) <= 1


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, :5] = 255  # white stripe on the left of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(image).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (30, 10, 3)
    # after a 90 degree clockwise rotation the left stripe is at the top
    assert out[:5].mean() > 200 and out[10:].mean() < 30


def _png_with_size(width, height):
    buf = pyio.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.find(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.jpg", b"", "empty"),
        ("text.png", b"hello, I am not an image\n" * 10, "not a recognised image"),
        ("zero.png", _png_with_size(0, 5), ""),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert name in str(err.value)
    assert reason in str(err.value)
    assert err.value.path == str(path)


def test_truncated_and_missing_files(tmp_path):
    buf = pyio.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_absurdly_large_image_is_refused(tmp_path, monkeypatch):
    Image.fromarray(_rgb(50, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(uio, "MAX_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="above the limit"):
        read_image(tmp_path / "big.png")


def test_label_maps_use_8_or_16_bits(tmp_path):
    small = np.array([[0, 5], [255, 1]])
    write_label_map(tmp_path / "s.png", small)
    assert Image.open(tmp_path / "s.png").mode == "L"
    np.testing.assert_array_equal(read_label_map(tmp_path / "s.png"), small)
    big = np.array([[0, 256], [70000 - 4465, 3]])
    write_label_map(tmp_path / "b.png", big)
    assert Image.open(tmp_path / "b.png").mode.startswith("I;16")
    np.testing.assert_array_equal(read_label_map(tmp_path / "b.png"), big)
    with pytest.raises(ValueError, match="non-negative"):
        write_label_map(tmp_path / "n.png", np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="65535"):
        write_label_map(tmp_path / "h.png", np.array([[70000]]))


def test_colour_label_map_is_rejected(tmp_path):
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "c.png")
    with pytest.raises(ImageReadError, match="colour image"):
        read_label_map(tmp_path / "c.png")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with uio.atomic_write_path(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_overlay_marks_boundaries_and_keeps_shape():
    image = np.full((10, 12, 3), 100, np.uint8)
    labels = np.zeros((10, 12), int)
    labels[:, 6:] = 7
    out = uio.overlay(image, labels, boundary_color=(255, 0, 255))
    assert out.shape == image.shape and out.dtype == np.uint8
    is_boundary = (out == [255, 0, 255]).all(axis=-1)
    # a one-pixel boundary line between the two labels, nowhere else
    assert is_boundary[:, 5:7].any(axis=1).all()
    assert is_boundary.sum() == 10
    assert not np.array_equal(out[0, 0], out[0, 11])  # two labels, two colours
    with pytest.raises(ValueError, match="differ in size"):
        uio.overlay(image, labels[:5])


def test_label_colors_are_distinct_and_deterministic():
    c = uio.label_colors(50)
    assert len({tuple(x) for x in c}) == 50
    np.testing.assert_array_equal(c, uio.label_colors(50))
