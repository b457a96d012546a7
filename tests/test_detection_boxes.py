"""IoU, the box coder and the ground-truth checks, against float64 loops
and torchvision's box_iou."""

import jax
import numpy as np
import pytest

from condconv_jax.detection import (decode_boxes, encode_boxes, iou,
                                    ssd_anchors, validate_ground_truth)
from tests import test_detection_reference as ref


def random_boxes(rng, n, min_size=0.0):
  yx = rng.uniform(0, 0.9, (n, 2))
  hw = rng.uniform(min_size, 0.5, (n, 2))
  return np.concatenate([yx, np.minimum(yx + hw, 1.0)], -1).astype(
      np.float32)


def test_iou_matches_loops_and_torchvision():
  torchvision = pytest.importorskip('torchvision')
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, 13), random_boxes(rng, 17)
  b[3] = a[2]  # identical pair
  b[4] = [0.2, 0.2, 0.2, 0.6]  # zero area
  ours = np.asarray(iou(a, b))
  np.testing.assert_allclose(ours, ref.iou(a, b), atol=1e-6)
  # torchvision takes [x1, y1, x2, y2]; IoU is symmetric in the axes.
  peer = torchvision.ops.box_iou(torch.tensor(a[:, [1, 0, 3, 2]]),
                                 torch.tensor(b[:, [1, 0, 3, 2]])).numpy()
  np.testing.assert_allclose(ours, peer, atol=1e-6)
  # Batched leading dims broadcast.
  assert iou(a[None].repeat(2, 0), b[None].repeat(2, 0)).shape == (2, 13, 17)


def test_encode_by_hand():
  anchor = np.array([0.2, 0.2, 0.6, 0.4], np.float32)
  box = np.array([0.3, 0.2, 0.7, 0.6], np.float32)
  # Centers (0.4, 0.3) -> (0.5, 0.4); size 0.4 x 0.2 -> 0.4 x 0.4.
  np.testing.assert_allclose(encode_boxes(box, anchor),
                             [2.5, 5.0, 0.0, 5 * np.log(2)], rtol=1e-5,
                             atol=1e-5)


def test_coder_round_trip_and_reference():
  rng = np.random.default_rng(1)
  anchors = ssd_anchors(300)
  boxes = random_boxes(rng, len(anchors), min_size=0.01)
  codes = np.asarray(encode_boxes(boxes, anchors))
  expected = np.array([ref.encode(b, a) for b, a in zip(boxes, anchors)])
  np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(decode_boxes(codes, anchors), boxes, atol=2e-6)
  decoded = np.array([ref.decode(c, a) for c, a in zip(codes, anchors)])
  np.testing.assert_allclose(decode_boxes(codes, anchors), decoded,
                             atol=2e-6)


def test_coder_jits_and_broadcasts():
  anchors = ssd_anchors(64)
  codes = np.random.default_rng(2).normal(size=(3, len(anchors), 4))
  boxes = jax.jit(decode_boxes)(codes, anchors[None])
  assert boxes.shape == (3, len(anchors), 4)
  np.testing.assert_allclose(jax.jit(encode_boxes)(boxes, anchors[None]),
                             codes, atol=1e-4)


def test_degenerate_and_huge_codes_stay_finite():
  anchor = np.array([0.2, 0.2, 0.6, 0.4], np.float32)
  point = np.array([0.3, 0.3, 0.3, 0.3], np.float32)
  assert np.isfinite(np.asarray(encode_boxes(point, anchor))).all()
  huge = decode_boxes(np.array([0, 0, 1e4, 1e4], np.float32), anchor)
  assert np.isfinite(np.asarray(huge)).all()
  # The size bound is 62.5x the anchor (log(1000 / 16)).
  np.testing.assert_allclose(huge[2] - huge[0], 0.4 * 62.5, rtol=1e-5)


@pytest.mark.parametrize('fn', [encode_boxes, decode_boxes])
def test_coder_rejects_wrong_last_dimension(fn):
  with pytest.raises(ValueError, match='dimension of 4'):
    fn(np.zeros((5, 3)), np.zeros((5, 4)))


def good_batch():
  boxes = np.array([[[0.1, 0.1, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]],
                    [[0.2, 0.3, 0.4, 0.5], [9.0, -3.0, 0.0, 0.0]]],
                   np.float32)
  labels = np.array([[1, 90], [5, 0]])
  mask = np.array([[True, True], [True, False]])  # [1, 1] is padding
  return boxes, labels, mask


def test_validate_accepts_padding_with_garbage():
  validate_ground_truth(*good_batch(), num_classes=91)


@pytest.mark.parametrize('edit,match', [
    (lambda b, l, m: b.__setitem__((0, 0), [0.5, 0.1, 0.1, 0.6]),
     'ymin > ymax'),
    (lambda b, l, m: b.__setitem__((0, 0), [10, 20, 100, 200]),
     'outside \\[0, 1\\].*pixel'),
    (lambda b, l, m: b.__setitem__((0, 0, 0), np.nan), 'not finite'),
    (lambda b, l, m: l.__setitem__((0, 1), 91), 'out of range'),
    (lambda b, l, m: l.__setitem__((0, 1), 0), 'out of range'),
])
def test_validate_rejects_bad_values(edit, match):
  boxes, labels, mask = good_batch()
  edit(boxes, labels, mask)
  with pytest.raises(ValueError, match=match):
    validate_ground_truth(boxes, labels, mask, num_classes=91)


def test_validate_rejects_bad_shapes_and_types():
  boxes, labels, mask = good_batch()
  with pytest.raises(ValueError, match='rank 3'):
    validate_ground_truth(boxes[0], labels, mask, 91)
  with pytest.raises(ValueError, match='dimension of 4'):
    validate_ground_truth(boxes[..., :3], labels, mask, 91)
  with pytest.raises(ValueError, match='batch, max_boxes'):
    validate_ground_truth(boxes, labels[:, :1], mask, 91)
  with pytest.raises(ValueError, match='integers'):
    validate_ground_truth(boxes, labels.astype(np.float32), mask, 91)
  with pytest.raises(ValueError, match='boolean'):
    validate_ground_truth(boxes, labels, mask * 2, 91)
