"""Argmax matching and target assignment against brute-force loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax.detection import (argmax_match, assign_targets, iou,
                                    ssd_anchors)
from tests import test_detection_reference as ref
from tests.test_detection_boxes import random_boxes


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('thresholds', [(0.5, 0.5), (0.5, 0.3)])
def test_argmax_match_matches_the_loop(seed, thresholds):
  rng = np.random.default_rng(seed)
  # Quantized similarities: many ties, values exactly at the thresholds.
  sim = rng.integers(0, 8, (6, 40)).astype(np.float32) / 8
  valid = rng.random(6) < 0.7
  valid[0] = True
  ours = argmax_match(jnp.asarray(sim), jnp.asarray(valid), *thresholds)
  np.testing.assert_array_equal(ours, ref.argmax_match(sim, valid,
                                                       *thresholds))


def test_force_match_conflict_goes_to_the_first_box():
  sim = np.array([[0.3, 0.2, 0.1], [0.4, 0.1, 0.0], [0.0, 0.2, 0.3]],
                 np.float32)
  # Rows 0 and 1 both force column 0 -> row 0; row 2 forces column 2.
  np.testing.assert_array_equal(argmax_match(sim, np.ones(3, bool)),
                                [0, -1, 2])
  np.testing.assert_array_equal(
      argmax_match(sim, np.ones(3, bool), force_match=False), [-1, -1, -1])


def test_padding_and_empty_ground_truth():
  sim = np.array([[0.9, 0.6], [0.1, 0.2]], np.float32)
  np.testing.assert_array_equal(argmax_match(sim, np.array([False, True])),
                                [-1, 1])
  np.testing.assert_array_equal(argmax_match(sim, np.zeros(2, bool)),
                                [-1, -1])
  np.testing.assert_array_equal(argmax_match(np.zeros((0, 3)),
                                             np.zeros(0, bool)), [-1] * 3)


def test_argmax_match_rejects_bad_thresholds_and_shapes():
  with pytest.raises(ValueError, match='unmatched_threshold'):
    argmax_match(np.zeros((2, 3)), np.ones(2, bool), 0.4, 0.6)
  with pytest.raises(ValueError, match=r'\[G, A\]'):
    argmax_match(np.zeros((2, 3)), np.ones(3, bool))


def gt_batch(rng, batch=3, max_boxes=5):
  boxes = np.stack([random_boxes(rng, max_boxes, 0.05) for _ in range(batch)])
  labels = rng.integers(1, 91, (batch, max_boxes))
  mask = rng.random((batch, max_boxes)) < 0.7
  mask[-1] = False  # an image without objects
  boxes[~mask] = 0.0
  return boxes, labels, mask


def test_assign_targets_matches_the_loop():
  rng = np.random.default_rng(0)
  anchors = ssd_anchors(128)
  boxes, labels, mask = gt_batch(rng)
  sim = np.asarray(iou(boxes, anchors))
  targets = jax.jit(assign_targets)(anchors, boxes, labels, mask)
  for b in range(len(boxes)):
    match = ref.argmax_match(sim[b], mask[b])
    np.testing.assert_array_equal(targets.match[b], match)
    positive = match >= 0
    np.testing.assert_array_equal(targets.positive[b], positive)
    np.testing.assert_array_equal(targets.negative[b], match == -1)
    np.testing.assert_array_equal(
        targets.labels[b], np.where(positive, labels[b][match], 0))
    expected = np.array([ref.encode(boxes[b, m], a) if m >= 0 else [0.0] * 4
                         for m, a in zip(match, anchors)])
    np.testing.assert_allclose(targets.box_targets[b], expected, atol=1e-3)
  # Every real box is matched to at least one anchor (force match).
  for b, g in zip(*np.nonzero(mask)):
    assert (targets.match[b] == g).any()
  assert not targets.positive[-1].any()


def test_matcher_iou_agrees_with_the_float64_loop():
  # The end-to-end test above feeds the loop float32 IoUs; check those.
  rng = np.random.default_rng(0)
  anchors = ssd_anchors(128)
  boxes, _, _ = gt_batch(rng)
  np.testing.assert_allclose(iou(boxes[0], anchors),
                             ref.iou(boxes[0], anchors), atol=1e-6)


def test_assign_targets_without_ground_truth_slots():
  anchors = ssd_anchors(64)
  targets = assign_targets(anchors, np.zeros((2, 0, 4)),
                           np.zeros((2, 0), np.int32), np.zeros((2, 0), bool))
  assert targets.box_targets.shape == (2, len(anchors), 4)
  assert not targets.positive.any() and targets.negative.all()


@pytest.mark.parametrize('boxes,labels,mask,match', [
    (np.zeros((2, 3, 4)), np.zeros((2, 3), int), np.zeros((2, 4), bool),
     'batch, max_boxes'),
    (np.zeros((3, 4)), np.zeros((3,), int), np.zeros((3,), bool), 'rank 3'),
    (np.zeros((2, 3, 5)), np.zeros((2, 3), int), np.zeros((2, 3), bool),
     'dimension of 4'),
    (np.zeros((2, 3, 4)), np.zeros((2, 3)), np.zeros((2, 3), bool),
     'integers'),
])
def test_assign_targets_rejects_bad_shapes(boxes, labels, mask, match):
  with pytest.raises(ValueError, match=match):
    assign_targets(ssd_anchors(64), boxes, labels, mask)
