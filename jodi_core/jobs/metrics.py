"""Quality metrics for Jodi's outputs: depth, surface normals, segmentation and edges.

Pure functions on CPU tensors (numpy arrays are accepted too); nothing here runs a model. Per-image functions take
single maps ``(H, W)`` (or ``(3, H, W)`` for normals) and return per-image values or per-pixel maps; the dataset-level
aggregates (confusion matrix, edge match counts) are sums, so results over many images are exact totals, not means of
ratios.

Definitions:

- Depth, :func:`aligned_absrel`: Jodi's depth maps are relative disparity (near bright, far dark, unknown scale and
  shift). The prediction ``p`` is aligned to the ground-truth disparity ``1 / z`` by least squares over the valid
  pixels (finite, positive ``z``: the sky is excluded), ``s, t = argmin sum (s p + t - 1 / z)^2``; the aligned
  disparity is clamped from below to ``1 / max(z)`` (so no aligned depth lies beyond the farthest valid pixel, and
  none is negative or infinite), and ``AbsRel = mean |1 / (s p + t) - z| / z`` over the valid pixels;
  :func:`aligned_depth_errors` also gives ``delta1``, the fraction of pixels within a factor 1.25 of ``z``.
- Normals, :func:`normal_angle_map`: colour-coded normal maps decode as ``n = normalize(2 rgb - 1)`` (the Jodi
  convention: x left, y up, z towards the camera); the error is ``acos(n_pred . n_gt)`` in degrees per pixel.
- Segmentation, :func:`confusion_matrix`, :func:`pixel_accuracy`, :func:`mean_iou`: the mean IoU averages the classes
  that occur in the ground truth or the prediction (union > 0); absent classes are NaN in the per-class list.
- Edges, :func:`edge_match_counts`, :func:`edge_f_score`: binary maps; a predicted edge pixel is correct when a
  ground-truth edge pixel lies within ``tolerance`` pixels (Chebyshev distance, i.e. in the ``(2 r + 1)^2`` square
  around it), and a ground-truth edge pixel is recalled when a predicted one lies within the same distance.
  Precision and recall come from the summed counts; F = 2 P R / (P + R).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "align_scale_shift",
    "aligned_absrel",
    "aligned_depth_errors",
    "depth_from_disparity_map",
    "normals_from_rgb",
    "normal_angle_map",
    "confusion_matrix",
    "pixel_accuracy",
    "mean_iou",
    "EdgeCounts",
    "edge_match_counts",
    "edge_f_score",
]


def _as_tensor(name: str, x, dtype=torch.float64) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # noqa: BLE001 - report what could not be converted
            raise TypeError(f"{name} must be a tensor or an array, got {type(x).__name__}.") from e
    return x.detach().to("cpu", dtype) if dtype is not None else x.detach().to("cpu")


def _check_same_shape(**maps: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in maps.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"Shapes differ: {', '.join(f'{k} {s}' for k, s in shapes.items())}.")


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a single (H, W) map, got shape {tuple(x.shape)}.")


# ---------------------------------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------------------------------


def align_scale_shift(pred, target, mask=None) -> tuple[float, float]:
    """Least-squares ``(s, t)`` minimising ``sum (s pred + t - target)^2`` over ``mask``.

    A prediction that is constant on the mask gets ``s = 0`` and ``t = mean(target)`` (the best constant).
    """
    p, y = _as_tensor("pred", pred), _as_tensor("target", target)
    _check_same_shape(pred=p, target=y)
    m = torch.ones_like(p, dtype=torch.bool) if mask is None else _as_tensor("mask", mask, None).bool()
    _check_same_shape(pred=p, mask=m)
    p, y = p[m], y[m]
    if p.numel() == 0:
        raise ValueError("No valid pixels to align on.")
    pc, yc = p - p.mean(), y - y.mean()
    var = (pc * pc).sum()
    s = float((pc * yc).sum() / var) if var > 0 else 0.0
    return s, float(y.mean() - s * p.mean())


def aligned_depth_errors(pred_disparity, gt_depth, valid=None) -> tuple[float, float]:
    """``(AbsRel, delta1)`` of a relative-disparity map against metric depth after scale/shift alignment (see the
    module doc); ``delta1`` is the fraction of valid pixels with ``max(d / z, z / d) < 1.25``.

    ``pred_disparity (H, W)``: any affine function of disparity (a Jodi depth map in [0, 1], near bright).
    ``gt_depth (H, W)``: positive depth; ``inf``/``nan``/non-positive values (the sky) are excluded.
    ``valid (H, W)`` bool: further pixels to keep (optional).
    """
    p, z = _as_tensor("pred_disparity", pred_disparity), _as_tensor("gt_depth", gt_depth)
    _check_2d("pred_disparity", p)
    _check_same_shape(pred_disparity=p, gt_depth=z)
    if not torch.isfinite(p).all():
        raise ValueError("pred_disparity contains NaN or infinite values.")
    m = torch.isfinite(z) & (z > 0)
    if valid is not None:
        v = _as_tensor("valid", valid, None).bool()
        _check_same_shape(gt_depth=z, valid=v)
        m &= v
    if int(m.sum()) < 2:
        raise ValueError("aligned_absrel needs at least 2 valid (finite, positive depth) pixels.")
    z_safe = torch.where(m, z, torch.ones_like(z))
    s, t = align_scale_shift(p, 1.0 / z_safe, m)
    disparity = (s * p[m] + t).clamp(min=1.0 / float(z[m].max()))
    depth, zm = 1.0 / disparity, z[m]
    absrel = float(((depth - zm).abs() / zm).mean())
    delta1 = float((torch.maximum(depth / zm, zm / depth) < 1.25).double().mean())
    return absrel, delta1


def aligned_absrel(pred_disparity, gt_depth, valid=None) -> float:
    """AbsRel after scale/shift alignment: the first value of :func:`aligned_depth_errors`."""
    return aligned_depth_errors(pred_disparity, gt_depth, valid)[0]


def depth_from_disparity_map(depth_map, min_disparity: float = 0.05) -> torch.Tensor:
    """A Jodi depth map (relative disparity in [0, 1], near bright) as a depth ``1 / d`` up to scale, with ``inf``
    where ``d < min_disparity`` (the sky and the far background, whose depth a normalised map cannot resolve)."""
    d = _as_tensor("depth_map", depth_map)
    if not min_disparity > 0:
        raise ValueError(f"min_disparity must be positive, got {min_disparity!r}.")
    return torch.where(d >= min_disparity, 1.0 / d.clamp(min=min_disparity), torch.full_like(d, math.inf))


# ---------------------------------------------------------------------------------------------------------------------
# Normals
# ---------------------------------------------------------------------------------------------------------------------


def normals_from_rgb(rgb) -> torch.Tensor:
    """Colour-coded normals ``(3, H, W)`` in [0, 1] -> unit vectors ``(3, H, W)`` (``2 rgb - 1``, normalised;
    a zero vector (mid-grey) stays zero)."""
    x = _as_tensor("rgb", rgb)
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"A normal map must be (3, H, W), got shape {tuple(x.shape)}.")
    return F.normalize(x * 2 - 1, dim=0, eps=1e-12)


def normal_angle_map(pred, gt) -> torch.Tensor:
    """Per-pixel angle in degrees ``(H, W)`` between two normal fields ``(3, H, W)`` (normalised here; a zero
    vector counts as 90 degrees from everything)."""
    a, b = _as_tensor("pred", pred), _as_tensor("gt", gt)
    _check_same_shape(pred=a, gt=b)
    if a.dim() != 3 or a.shape[0] != 3:
        raise ValueError(f"Normal fields must be (3, H, W), got shape {tuple(a.shape)}.")
    cos = (F.normalize(a, dim=0, eps=1e-12) * F.normalize(b, dim=0, eps=1e-12)).sum(0)
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------------------


def confusion_matrix(pred, gt, num_classes: int = 12, valid=None) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = ground truth, columns = prediction."""
    p, g = _as_tensor("pred", pred, None), _as_tensor("gt", gt, None)
    _check_same_shape(pred=p, gt=g)
    if p.is_floating_point() or g.is_floating_point():
        raise TypeError("Segmentation maps must hold integer class indices.")
    p, g = p.long().flatten(), g.long().flatten()
    if valid is not None:
        v = _as_tensor("valid", valid, None).bool().flatten()
        if v.numel() != p.numel():
            raise ValueError("valid must have the shape of the segmentation maps.")
        p, g = p[v], g[v]
    for name, t in (("pred", p), ("gt", g)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} holds class indices outside 0..{num_classes - 1}.")
    return torch.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def pixel_accuracy(conf: torch.Tensor) -> float:
    total = int(conf.sum())
    if total == 0:
        raise ValueError("The confusion matrix is empty.")
    return float(conf.diagonal().sum()) / total


def mean_iou(conf: torch.Tensor) -> tuple[float, list[float]]:
    """(mIoU over the classes with a non-empty union, per-class IoU with NaN for absent classes)."""
    conf = conf.double()
    inter = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))
    present = union > 0
    if not present.any():
        raise ValueError("The confusion matrix is empty.")
    return float(iou[present].mean()), iou.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Edges
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EdgeCounts:
    """Summable edge matching counts (``a + b`` adds two images' counts)."""

    matched_pred: int = 0  # predicted edge pixels with a ground-truth edge within the tolerance
    pred: int = 0
    matched_gt: int = 0  # ground-truth edge pixels with a predicted edge within the tolerance
    gt: int = 0

    def __add__(self, other: "EdgeCounts") -> "EdgeCounts":
        return EdgeCounts(self.matched_pred + other.matched_pred, self.pred + other.pred,
                          self.matched_gt + other.matched_gt, self.gt + other.gt)


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    if r == 0:
        return mask
    return F.max_pool2d(mask[None, None].float(), 2 * r + 1, stride=1, padding=r)[0, 0] > 0


def edge_match_counts(pred, gt, tolerance: int = 1, threshold: Optional[float] = 0.5) -> EdgeCounts:
    """Counts for :func:`edge_f_score` from two ``(H, W)`` edge maps; maps are binarised with ``> threshold``
    (``threshold=None``: already boolean)."""
    p, g = _as_tensor("pred", pred, None), _as_tensor("gt", gt, None)
    _check_2d("pred", p)
    _check_same_shape(pred=p, gt=g)
    if isinstance(tolerance, bool) or int(tolerance) != tolerance or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative integer (pixels), got {tolerance!r}.")
    if threshold is None:
        p, g = p.bool(), g.bool()
    else:
        p, g = p.double() > threshold, g.double() > threshold
    r = int(tolerance)
    return EdgeCounts(
        matched_pred=int((p & _dilate(g, r)).sum()),
        pred=int(p.sum()),
        matched_gt=int((g & _dilate(p, r)).sum()),
        gt=int(g.sum()),
    )


def edge_f_score(counts: EdgeCounts) -> tuple[float, float, float]:
    """(precision, recall, F). An empty prediction has precision 1, an empty ground truth recall 1."""
    precision = counts.matched_pred / counts.pred if counts.pred else 1.0
    recall = counts.matched_gt / counts.gt if counts.gt else 1.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f
