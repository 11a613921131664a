"""jodi_core.jobs.metrics on hand-made inputs whose answers are worked out by hand in each test."""

import math

import numpy as np
import pytest
import torch

from jodi_core.jobs import metrics


# ---- depth ----------------------------------------------------------------------------------------------------------


def _depth_scene():
    """A 4x4 depth map with a sky row (inf) and depths 1..4."""
    z = torch.tensor([[math.inf] * 4, [4.0, 4.0, 2.0, 2.0], [2.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    return z


def test_align_scale_shift_recovers_an_affine_map():
    p = torch.tensor([0.0, 1.0, 2.0, 3.0])
    s, t = metrics.align_scale_shift(p, 3 * p - 2)
    assert s == pytest.approx(3.0) and t == pytest.approx(-2.0)
    # Constant prediction: the best constant is the mean of the target.
    assert metrics.align_scale_shift(torch.ones(3), torch.tensor([1.0, 2.0, 6.0])) == pytest.approx((0.0, 3.0))


def test_aligned_absrel_is_zero_for_any_affine_function_of_disparity():
    z = _depth_scene()
    disparity = torch.where(torch.isfinite(z), 1 / z, torch.zeros_like(z))
    assert metrics.aligned_absrel(disparity, z) == pytest.approx(0.0, abs=1e-12)
    # Jodi's maps are normalised disparity: any scale and shift, and whatever the sky holds, gives 0 too.
    pred = 0.37 * disparity + 0.1
    pred[0] = 0.9
    assert metrics.aligned_absrel(pred, z) == pytest.approx(0.0, abs=1e-12)
    # numpy input works the same
    assert metrics.aligned_absrel(pred.numpy(), z.numpy()) == pytest.approx(0.0, abs=1e-12)


def test_aligned_absrel_hand_computed_value():
    # Two pixels at depth 1 and 2 (disparity 1, 0.5) and a constant prediction: s = 0, t = mean disparity = 0.75,
    # aligned depth 4/3 everywhere: AbsRel = (|4/3 - 1| / 1 + |4/3 - 2| / 2) / 2 = (1/3 + 1/3) / 2 = 1/3.
    z = torch.tensor([[1.0, 2.0]])
    assert metrics.aligned_absrel(torch.tensor([[0.5, 0.5]]), z) == pytest.approx(1 / 3)
    # A prediction inverted in sign (far bright) is fitted with a negative scale: still exact for two pixels.
    assert metrics.aligned_absrel(torch.tensor([[0.0, 1.0]]), z) == pytest.approx(0.0, abs=1e-12)


def test_aligned_absrel_clamps_to_the_farthest_valid_depth():
    # Disparities 1, 1, 1 and 0.5 (depths 1, 1, 1, 2); prediction 1, 1, 1, -2: least squares s = 1/6, t = 5/6 gives
    # aligned disparities 1, 1, 1, 0.5 exactly (here no clamp is needed) ...
    z = torch.tensor([[1.0, 1.0, 1.0, 2.0]])
    p = torch.tensor([[1.0, 1.0, 1.0, -2.0]])
    assert metrics.aligned_absrel(p, z) == pytest.approx(0.0, abs=1e-12)
    # ... while a fitted disparity below 1 / max(z) is raised to it, so the depth error stays finite. Depths 1, 3, 3
    # (disparity 1, 1/3, 1/3), predictions 1, 0, -1: s = 1/3, t = 5/9, aligned disparities 8/9, 5/9, 2/9 -> 1/3
    # (clamped), depths 9/8, 9/5, 3: AbsRel = (1/8 + (3 - 9/5) / 3 + 0) / 3 = 0.175.
    z3 = torch.tensor([[1.0, 3.0, 3.0]])
    p3 = torch.tensor([[1.0, 0.0, -1.0]])
    assert metrics.align_scale_shift(p3, 1 / z3) == pytest.approx((1 / 3, 5 / 9))
    assert metrics.aligned_absrel(p3, z3) == pytest.approx(0.175)
    # delta1: ratios 9/8 and 3/5 -> 5/3 and 1: two of three pixels within 1.25.
    assert metrics.aligned_depth_errors(p3, z3) == pytest.approx((0.175, 2 / 3))


def test_aligned_absrel_valid_mask_and_errors():
    z = torch.tensor([[1.0, 2.0, 4.0]])
    p = torch.tensor([[1.0, 0.5, 7.0]])  # the last pixel is wrong but masked out
    assert metrics.aligned_absrel(p, z, valid=torch.tensor([[True, True, False]])) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 valid"):
        metrics.aligned_absrel(torch.zeros(1, 2), torch.tensor([[math.inf, 1.0]]))
    with pytest.raises(ValueError, match="Shapes differ"):
        metrics.aligned_absrel(torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        metrics.aligned_absrel(torch.zeros(1, 2, 2), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        metrics.aligned_absrel(torch.tensor([[math.nan, 1.0]]), torch.ones(1, 2))


def test_depth_from_disparity_map():
    d = metrics.depth_from_disparity_map(torch.tensor([1.0, 0.5, 0.01]), min_disparity=0.05)
    assert d.tolist() == [1.0, 2.0, math.inf]
    with pytest.raises(ValueError, match="positive"):
        metrics.depth_from_disparity_map(torch.ones(2), 0.0)


# ---- normals --------------------------------------------------------------------------------------------------------


def test_normals_from_rgb_decodes_the_colour_convention():
    # (0.5, 0.5, 1) blue faces the camera, (0.5, 1, 0.5) green faces up, (1, 0.5, 0.5) red faces left.
    rgb = torch.tensor([[0.5, 0.5, 1.0], [0.5, 1.0, 0.5], [1.0, 0.5, 0.5]]).T.reshape(3, 1, 3)
    n = metrics.normals_from_rgb(rgb)
    assert torch.allclose(n[:, 0, 0], torch.tensor([0.0, 0.0, 1.0], dtype=n.dtype))
    assert torch.allclose(n[:, 0, 1], torch.tensor([0.0, 1.0, 0.0], dtype=n.dtype))
    assert torch.allclose(n[:, 0, 2], torch.tensor([1.0, 0.0, 0.0], dtype=n.dtype))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        metrics.normals_from_rgb(torch.zeros(4, 4, 3))


def test_normal_angle_map_known_angles():
    gt = torch.tensor([[0.0, 0.0, 1.0]] * 4).T.reshape(3, 2, 2)
    s = math.sqrt(0.5)
    pred = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, s, s], [0.0, 0.0, -2.0]]).T.reshape(3, 2, 2)
    angles = metrics.normal_angle_map(pred, gt)
    assert angles.flatten().tolist() == pytest.approx([0.0, 90.0, 45.0, 180.0], abs=1e-5)
    # Through the colour code: a 60-degree tilt, (0, sin 60, cos 60) encoded, against the camera-facing blue.
    tilt = torch.tensor([0.0, math.sin(math.pi / 3), math.cos(math.pi / 3)])
    rgb = ((tilt + 1) / 2).reshape(3, 1, 1)
    blue = torch.tensor([0.5, 0.5, 1.0]).reshape(3, 1, 1)
    err = metrics.normal_angle_map(metrics.normals_from_rgb(rgb), metrics.normals_from_rgb(blue))
    assert float(err) == pytest.approx(60.0, abs=1e-4)


# ---- segmentation ---------------------------------------------------------------------------------------------------


def test_confusion_accuracy_and_miou_by_hand():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 2]])
    conf = metrics.confusion_matrix(pred, gt, num_classes=4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    assert metrics.pixel_accuracy(conf) == pytest.approx(6 / 8)
    miou, per_class = metrics.mean_iou(conf)
    # class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 3 / (4 + 3 - 3) = 3/4; class 3 absent
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 3 / 4])
    assert math.isnan(per_class[3])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    # Sums over images are dataset totals.
    assert torch.equal(metrics.confusion_matrix(pred[:1], gt[:1], 4) + metrics.confusion_matrix(pred[1:], gt[1:], 4),
                       conf)


def test_confusion_matrix_errors():
    with pytest.raises(ValueError, match="outside 0..11"):
        metrics.confusion_matrix(torch.tensor([12]), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer"):
        metrics.confusion_matrix(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="empty"):
        metrics.pixel_accuracy(torch.zeros(3, 3, dtype=torch.long))


# ---- edges ----------------------------------------------------------------------------------------------------------


def test_edge_f_score_with_tolerance():
    gt = torch.zeros(8, 8)
    gt[:, 3] = 1  # a vertical line, 8 pixels
    pred = torch.zeros(8, 8)
    pred[:4, 4] = 1  # half of it, one pixel off
    pred[0, 7] = 1  # and a stray pixel far away
    exact = metrics.edge_match_counts(pred, gt, tolerance=0)
    assert (exact.matched_pred, exact.pred, exact.matched_gt, exact.gt) == (0, 5, 0, 8)
    assert metrics.edge_f_score(exact) == (0.0, 0.0, 0.0)
    loose = metrics.edge_match_counts(pred, gt, tolerance=1)
    # 4 of 5 predicted pixels lie within 1 px of the line; ground-truth rows 0..4 have a prediction within 1 px
    # (row 4 through the diagonal neighbour (3, 4)): 5 of 8.
    assert (loose.matched_pred, loose.pred, loose.matched_gt, loose.gt) == (4, 5, 5, 8)
    p, r, f = metrics.edge_f_score(loose)
    assert (p, r) == pytest.approx((0.8, 0.625))
    assert f == pytest.approx(2 * 0.8 * 0.625 / (0.8 + 0.625))
    # Counts add up over images; maps are binarised at 0.5 by default.
    both = loose + metrics.edge_match_counts(gt * 0.9, gt, tolerance=1)
    assert (both.matched_pred, both.pred, both.matched_gt, both.gt) == (12, 13, 13, 16)
    assert metrics.edge_match_counts(gt * 0.4, gt).pred == 0


def test_edge_f_score_empty_cases_and_errors():
    empty = metrics.EdgeCounts()
    assert metrics.edge_f_score(empty) == (1.0, 1.0, 1.0)
    nothing_found = metrics.edge_match_counts(np.zeros((4, 4)), np.eye(4))
    assert metrics.edge_f_score(nothing_found) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="tolerance"):
        metrics.edge_match_counts(torch.zeros(2, 2), torch.zeros(2, 2), tolerance=-1)
