"""NMS and post-processing against plain greedy NumPy NMS, TF's per-class
merge, and torchvision's nms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax.detection import (decode_boxes,
                                    multiclass_non_max_suppression,
                                    non_max_suppression, postprocess,
                                    ssd_anchors)
from tests import test_detection_reference as ref
from tests.test_detection_boxes import random_boxes

nms_jit = jax.jit(non_max_suppression, static_argnums=2)


def check_nms(boxes, scores, max_outputs, iou_threshold,
              score_threshold=-np.inf):
  indices, count = nms_jit(boxes, scores, max_outputs, iou_threshold,
                           score_threshold)
  expected = ref.greedy_nms(boxes, scores, iou_threshold, max_outputs,
                            score_threshold)
  assert int(count) == len(expected)
  np.testing.assert_array_equal(indices[:count], expected)
  assert (np.asarray(indices[count:]) == -1).all()
  return expected


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('iou_threshold', [0.3, 0.6])
def test_nms_matches_greedy_numpy(seed, iou_threshold):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 60)
  scores = rng.random(60).astype(np.float32)
  check_nms(boxes, scores, 20, iou_threshold)
  check_nms(boxes, scores, 20, iou_threshold, score_threshold=0.5)


def test_nms_ties_go_to_the_lower_index():
  rng = np.random.default_rng(3)
  boxes = random_boxes(rng, 40)
  scores = rng.integers(0, 4, 40).astype(np.float32)  # many equal scores
  check_nms(boxes, scores, 40, 0.2)
  same = np.tile([[0.1, 0.1, 0.5, 0.5]], (5, 1)).astype(np.float32)
  assert check_nms(same, np.ones(5, np.float32), 5, 0.5) == [0]


def test_nms_empty_and_fewer_boxes_than_outputs():
  indices, count = non_max_suppression(np.zeros((0, 4), np.float32),
                                       np.zeros((0,), np.float32), 5, 0.5)
  assert int(count) == 0 and (np.asarray(indices) == -1).all()
  rng = np.random.default_rng(4)
  boxes = random_boxes(rng, 3)
  check_nms(boxes, rng.random(3).astype(np.float32), 10, 0.5)
  # Every score below the threshold: nothing.
  assert check_nms(boxes, np.zeros(3, np.float32), 10, 0.5,
                   score_threshold=0.1) == []


def test_nms_matches_torchvision():
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(5)
  boxes = random_boxes(rng, 200)
  scores = rng.random(200).astype(np.float32)
  keep = torchvision.ops.nms(torch.tensor(boxes[:, [1, 0, 3, 2]]),
                             torch.tensor(scores), 0.5).numpy()
  indices, count = non_max_suppression(boxes, scores, 200, 0.5)
  np.testing.assert_array_equal(indices[:count], keep)


def test_multiclass_nms_is_tf_per_class_nms_then_top_k():
  rng = np.random.default_rng(6)
  boxes = random_boxes(rng, 50)
  scores = rng.random((50, 4)).astype(np.float32)
  box_idx, cls_idx, det_scores, count = jax.jit(
      multiclass_non_max_suppression, static_argnums=2)(
          boxes, scores, 30, 0.5, 0.3)
  expected = ref.tf_multiclass_nms(boxes, scores, 0.5, 0.3, 30, 30)
  assert int(count) == len(expected)
  np.testing.assert_array_equal(box_idx[:count], [e[0] for e in expected])
  np.testing.assert_array_equal(cls_idx[:count], [e[1] for e in expected])
  np.testing.assert_allclose(det_scores[:count], [e[2] for e in expected])


def test_nms_rejects_bad_shapes():
  with pytest.raises(ValueError, match='scores must be'):
    non_max_suppression(np.zeros((5, 4)), np.zeros((5, 1)), 3, 0.5)
  with pytest.raises(ValueError, match='dimension of 4'):
    non_max_suppression(np.zeros((5, 2)), np.zeros(5), 3, 0.5)
  with pytest.raises(ValueError, match='num_classes'):
    multiclass_non_max_suppression(np.zeros((5, 4)), np.zeros((4, 2)), 3, 0.5)
  with pytest.raises(ValueError, match='max_outputs'):
    non_max_suppression(np.zeros((5, 4)), np.zeros(5), -1, 0.5)


def test_postprocess_matches_decode_sigmoid_and_tf_nms():
  rng = np.random.default_rng(7)
  anchors = ssd_anchors(96)
  num_anchors, num_classes = len(anchors), 6
  outputs = {
      'box_offsets': rng.normal(0, 1, (2, num_anchors, 4)).astype(np.float32),
      'class_logits': rng.normal(-2, 2, (2, num_anchors, num_classes)).astype(
          np.float32)}
  det = jax.jit(postprocess, static_argnames='max_detections')(
      outputs, anchors, max_detections=25)
  assert det['boxes'].shape == (2, 25, 4) and det['classes'].dtype == jnp.int32
  for b in range(2):
    boxes = np.array([ref.decode(c, a) for c, a in
                      zip(outputs['box_offsets'][b], anchors)])
    scores = 1 / (1 + np.exp(-outputs['class_logits'][b].astype(np.float64)))
    expected = ref.tf_multiclass_nms(boxes, scores[:, 1:], 0.6, 1e-8, 100, 25)
    count = int(det['count'][b])
    assert count == len(expected) == 25
    np.testing.assert_array_equal(det['classes'][b],
                                  [c + 1 for _, c, _ in expected])
    np.testing.assert_allclose(det['scores'][b], [s for _, _, s in expected],
                               rtol=1e-5)
    np.testing.assert_allclose(det['boxes'][b],
                               np.clip([boxes[i] for i, _, _ in expected],
                                       0, 1), atol=1e-5)


def test_postprocess_pads_when_few_detections():
  anchors = ssd_anchors(64)
  logits = np.full((1, len(anchors), 3), -30.0, np.float32)
  logits[0, 5, 2] = 3.0  # one confident box of class 2
  det = postprocess({'box_offsets': np.zeros((1, len(anchors), 4),
                                             np.float32),
                     'class_logits': logits}, anchors, max_detections=10,
                    score_threshold=0.01)
  assert int(det['count'][0]) == 1
  np.testing.assert_array_equal(det['classes'][0], [2] + [0] * 9)
  np.testing.assert_allclose(det['boxes'][0, 0], np.clip(anchors[5], 0, 1),
                             atol=1e-6)
  assert (np.asarray(det['boxes'][0, 1:]) == 0).all()
  assert (np.asarray(det['scores'][0, 1:]) == 0).all()


def test_postprocess_softmax_scores_drop_background():
  anchors = ssd_anchors(64)
  logits = np.zeros((1, len(anchors), 3), np.float32)
  logits[0, :, 0] = 5.0  # background everywhere
  logits[0, 7] = [0.0, 4.0, 0.0]
  det = postprocess({'box_offsets': np.zeros((1, len(anchors), 4),
                                             np.float32),
                     'class_logits': logits}, anchors,
                    score_converter='softmax', score_threshold=0.5)
  assert int(det['count'][0]) == 1 and int(det['classes'][0, 0]) == 1
  np.testing.assert_allclose(det['scores'][0, 0],
                             np.exp(4) / (np.exp(4) + 2), rtol=1e-6)


def test_postprocess_drops_boxes_outside_the_image():
  anchors = ssd_anchors(64)
  codes = np.zeros((1, len(anchors), 4), np.float32)
  codes[0, 0, :2] = 1e3  # centre far outside the image
  logits = np.full((1, len(anchors), 2), -30.0, np.float32)
  logits[0, :2, 1] = [5.0, 4.0]
  det = postprocess({'box_offsets': codes, 'class_logits': logits}, anchors)
  outside = decode_boxes(codes[0, 0], anchors[0])
  assert float(outside[0]) > 1  # the decoded box lies beyond the image
  assert int(det['count'][0]) == 1  # only anchor 1 survives


def test_postprocess_rejects_mismatched_anchors():
  anchors = ssd_anchors(64)
  outputs = {'box_offsets': np.zeros((1, len(anchors), 4), np.float32),
             'class_logits': np.zeros((1, len(anchors), 3), np.float32)}
  with pytest.raises(ValueError, match='anchors'):
    postprocess(outputs, ssd_anchors(96))
  with pytest.raises(ValueError, match='score_converter'):
    postprocess(outputs, anchors, score_converter='tanh')
