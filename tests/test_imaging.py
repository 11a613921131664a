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
