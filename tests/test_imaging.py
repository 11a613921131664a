"""Aspect buckets and condition resizing."""

import pytest
import torch

from jodi_core.imaging import (
    fit_condition,
    ASPECT_BUCKETS,
    aspect_preset_size,
    center_crop,
    check_size,
    resize,
    resize_and_crop,
    snap_to_bucket,
)


def test_fifteen_official_buckets_are_multiples_of_32_near_one_megapixel():
    assert len(ASPECT_BUCKETS) == 15
    for ratio, (h, w) in ASPECT_BUCKETS.items():
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h / w - ratio) < 0.02
        assert 0.85e6 < h * w < 1.1e6


@pytest.mark.parametrize(
    "hw,expected",
    [((1024, 1024), (1024, 1024)), ((1280, 1024), (1088, 896)), ((1024, 1280), (896, 1088)), ((720, 1280), (704, 1408)), ((100, 1000), (512, 2048))],
)
def test_snap_matches_reference_binning(hw, expected):
    assert snap_to_bucket(*hw) == expected


def test_snap_scales_to_other_base_sizes():
    h, w = snap_to_bucket(1280, 1024, base_size=512)
    assert (h, w) == (544, 448) and h % 32 == 0 and w % 32 == 0
    assert aspect_preset_size("16:9") == (704, 1408)
    with pytest.raises(ValueError, match="Unknown aspect preset"):
        aspect_preset_size("7:3")


def test_check_size_names_the_problem():
    check_size(64, 96)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        check_size(100, 64)
    with pytest.raises(ValueError, match="positive"):
        check_size(0, 64)
    import numpy as np

    check_size(np.int64(64), torch.tensor(96))  # numbers from numpy or torch are sizes too
    for bad in (float("nan"), True, "64", 64.5):
        with pytest.raises(ValueError, match="must be a positive integer"):
            check_size(bad, 64)


def test_resize_and_crop_covers_then_crops_centre():
    img = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 1, 4, 8).expand(1, 3, 4, 8)
    out = resize_and_crop(img, 4, 4)  # same height, crop the middle columns
    assert out.shape == (1, 3, 4, 4)
    torch.testing.assert_close(out, img[..., 2:6])
    tall = torch.rand(2, 3, 90, 40)
    assert resize_and_crop(tall, 64, 64).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="Cannot crop"):
        center_crop(tall, 100, 10)


def test_stretch_fit_keeps_outputs_aligned_with_the_input_and_crop_does_not():
    # A 1-px bright column at x = 10 of an 80 px wide, 64 px high input (aspect 0.8, not a bucket's).
    image = torch.zeros(1, 3, 64, 80)
    image[..., 10] = 1.0
    work_h, work_w = snap_to_bucket(64, 80, base_size=64, multiple=8)
    assert (work_h, work_w) != (64, 80) and work_h / work_w != 64 / 80

    def round_trip(fit):  # into the working size as a condition, then back to the input size as the outputs are
        back = resize(fit_condition(image, work_h, work_w, fit), 64, 80)
        return int(back[0, 0, 32].argmax())

    assert round_trip("stretch") == 10
    assert round_trip("crop") != 10  # the centre crop shifts what comes back
    assert torch.equal(fit_condition(image, work_h, work_w, "crop"), resize_and_crop(image, work_h, work_w))
    with pytest.raises(ValueError, match="condition fit must be one of crop, stretch"):
        fit_condition(image, work_h, work_w, "pad")


def test_extreme_aspect_ratios_crop_the_source_first():
    x = torch.linspace(0, 1, 1600)
    image = (torch.sin(x * 300)[None, :] * torch.ones(16, 1))[None, None].repeat(1, 3, 1, 1)  # 16 x 1600 stripes
    out = resize_and_crop(image, 64, 64)  # the covering image would be 64 x 6400
    assert out.shape == (1, 3, 64, 64)
    size = (64, int(1600 * 64 / 16))
    full = center_crop(resize(image, *size), 64, 64)  # the plain path, for comparison
    assert out.std() > 0.3 and (out - full).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# Reading files: one function, upright, 8-bit RGB from any mode, bounded size
# ---------------------------------------------------------------------------------------------------------------------


def _saved(tmp_path, im, name="x.png", **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_load_rgb8_converts_every_mode_to_8_bit_rgb(tmp_path):
    import numpy as np
    from PIL import Image

    from jodi_core.imaging import load_rgb8

    ramp16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    expected = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    # 16-bit grey PNG (Pillow: I;16) and the same values as a 32-bit integer image: scaled, not clipped
    for im, name in ((Image.fromarray(ramp16), "g16.png"), (Image.fromarray(ramp16.astype(np.int32), "I"), "i.tiff")):
        out = load_rgb8(_saved(tmp_path, im, name))
        assert out.dtype == np.uint8 and out.shape == (4, 256, 3)
        assert np.abs(out[..., 0].astype(int) - expected).max() <= 1 and (out[..., 0] == out[..., 2]).all()
    # float grey in [0, 1] (TIFF)
    out = load_rgb8(_saved(tmp_path, Image.fromarray((ramp16 / 65535).astype(np.float32), "F"), "f.tiff"))
    assert np.abs(out[..., 1].astype(int) - expected).max() <= 1
    # transparency is composited on white: RGBA, LA and a palette image with a transparent colour
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest fully transparent (black underneath)
    assert load_rgb8(_saved(tmp_path, Image.fromarray(rgba, "RGBA"))).tolist() == [
        [[255, 0, 0], [255, 255, 255]], [[255, 255, 255], [255, 255, 255]]]
    la = Image.fromarray(np.array([[[0, 255], [0, 0]]], np.uint8), "LA")
    assert load_rgb8(_saved(tmp_path, la)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    assert load_rgb8(_saved(tmp_path, p, transparency=0)).tolist() == [[[255, 255, 255], [0, 255, 0]]]
    # CMYK JPEG, 1-bit, grey
    cmyk = load_rgb8(_saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "c.jpg"))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 40  # red
    assert load_rgb8(_saved(tmp_path, Image.new("1", (3, 2), 1))).min() == 255
    assert load_rgb8(_saved(tmp_path, Image.new("L", (3, 2), 77))).tolist() == [[[77] * 3] * 3] * 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_rgb8_applies_exif_orientation(tmp_path, orientation):
    import numpy as np
    from PIL import Image, ImageOps

    from jodi_core.data.joint_dataset import load_image
    from jodi_core.imaging import load_rgb8, upright_copy

    arr = np.zeros((6, 10, 3), np.uint8)
    arr[:3, :5] = 255  # one white corner: every orientation looks different
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _saved(tmp_path, im, "o.png", exif=exif)
    with Image.open(path) as f:
        expected = np.asarray(ImageOps.exif_transpose(f).convert("RGB"))
    got = load_rgb8(path)
    assert got.shape == expected.shape and (got == expected).all()
    assert got.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))
    assert load_image(path, got.shape[:2]).shape == (3, *got.shape[:2])  # the training reader, too
    copy = upright_copy(path)
    if orientation == 1:
        assert copy is None  # copied as it is
    else:
        with Image.open(__import__("io").BytesIO(copy)) as f:
            assert f.getexif().get(0x0112, 1) == 1 and (np.asarray(f.convert("RGB")) == expected).all()


def test_load_rgb8_refuses_unreadable_and_oversized_files(tmp_path):
    from PIL import Image

    from jodi_core.imaging import MAX_IMAGE_PIXELS, load_rgb8

    assert MAX_IMAGE_PIXELS == 8192 * 8192
    path = _saved(tmp_path, Image.new("RGB", (100, 50)))
    assert load_rgb8(path).shape == (50, 100, 3)
    with pytest.raises(ValueError, match=r"cannot read image: 100x50 \(WxH\) is 0 MP, more than"):
        load_rgb8(path, max_pixels=4999)
    (tmp_path / "t.txt").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_rgb8(tmp_path / "t.txt")
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ValueError, match="0 bytes"):
        load_rgb8(tmp_path / "e.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "j.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "j.jpg").read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read image"):
        load_rgb8(tmp_path / "cut.jpg")
