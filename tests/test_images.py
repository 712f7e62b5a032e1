"""The shared image decoder (issue 23, defects 10 and 11): high-bit-depth greyscale and float images scaled to
8 bits as their values say (Pillow's convert clips them to white or black), EXIF orientation applied (as
`datasets` does), and the same decoder behind generate/logps/eval (decode_image) and the training collator."""

from __future__ import annotations

import io

import pytest

np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

from napo.data.generate import decode_image  # noqa: E402
from napo.data.store import RowError  # noqa: E402
from napo.images import ImageDecodeError, open_image, rgb_image  # noqa: E402


def _encoded(values, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(values, mode=mode) if mode else Image.fromarray(values)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _grey(image) -> list[int]:
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0].reshape(-1).tolist()


@pytest.mark.parametrize(
    ("values", "fmt", "expected"),
    [
        (np.array([[0, 257 * 100, 65535]], dtype=np.uint16), "PNG", [0, 100, 255]),  # 16-bit PNG
        (np.array([[0, 257 * 100, 65535]], dtype=np.uint16), "TIFF", [0, 100, 255]),  # I;16 TIFF
        (np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32), "TIFF", [0, 128, 255]),  # 32-bit integers
        (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "TIFF", [0, 128, 255]),  # float in [0, 1]
        (np.array([[0.0, 100.0, 255.0]], dtype=np.float32), "TIFF", [0, 100, 255]),  # float in [0, 255]
        (np.array([[0, 100, 255]], dtype=np.uint8), "PNG", [0, 100, 255]),  # 8-bit: as it was
    ],
    ids=["uint16-png", "uint16-tiff", "int32-tiff", "float-unit", "float-255", "uint8"],
)
def test_greyscale_of_every_depth_is_scaled_not_clipped(values, fmt, expected):
    raw = _encoded(values, fmt)
    assert _grey(decode_image(raw)) == expected
    assert _grey(open_image(raw)) == expected


def test_pillow_alone_clips_them_to_white_and_black():
    """What the decoder fixes: Pillow's own conversion (napo's before), shown on the same files."""
    sixteen = Image.open(io.BytesIO(_encoded(np.array([[257 * 100]], dtype=np.uint16), "PNG")))
    unit = Image.open(io.BytesIO(_encoded(np.array([[0.5]], dtype=np.float32), "TIFF")))
    assert _grey(sixteen.convert("RGB")) == [255] and _grey(unit.convert("RGB")) == [0]


@pytest.mark.parametrize("bad", [-1.0, 300.0, float("nan")])
def test_a_float_image_whose_values_say_no_scale_is_refused(bad):
    raw = _encoded(np.array([[0.0, bad]], dtype=np.float32), "TIFF")
    with pytest.raises(ImageDecodeError, match="float image with values"):
        open_image(raw)
    with pytest.raises(RowError, match="undecodable image: ImageDecodeError"):
        decode_image(raw)


def _rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF orientation (6: rotate 90 degrees clockwise) says it is shown 20x40."""
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    image.paste((10, 10, 200), (0, 0, 10, 20))  # the left edge blue: after the rotation, the top
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_applied_as_datasets_applies_it(tmp_path):
    raw = _rotated_jpeg()
    assert Image.open(io.BytesIO(raw)).size == (40, 20)  # Pillow alone: on its side
    decoded = decode_image({"bytes": raw, "path": None})
    assert decoded.size == (20, 40)
    top, bottom = np.asarray(decoded)[1, 10], np.asarray(decoded)[38, 10]
    assert top[2] > 150 and bottom[0] > 150  # the blue edge went to the top
    (tmp_path / "photo.jpg").write_bytes(raw)
    assert decode_image("photo.jpg", tmp_path).size == (20, 40)
    datasets = pytest.importorskip("datasets")
    seen = datasets.Image().decode_example({"bytes": raw, "path": None})
    assert seen.size == decoded.size


def test_the_training_collator_decodes_with_the_same_rules():
    from napo.train.collator import _images_of

    raw = _rotated_jpeg()
    assert [image.size for image in _images_of({"image": {"bytes": raw, "path": None}})] == [(20, 40)]
    sixteen = Image.open(io.BytesIO(_encoded(np.array([[257 * 100]], dtype=np.uint16), "PNG")))
    (already,) = _images_of({"images": [sixteen]})  # a PIL image handed over as it is (datasets' Image feature)
    assert _grey(already) == [100]
    assert rgb_image(Image.open(io.BytesIO(raw))).size == (20, 40)
