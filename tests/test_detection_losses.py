"""The SSD loss and hard negative mining against float64 loops of TF's
definitions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax.detection import (TF_COCO_LOSS, TF_TPU_FOCAL_LOSS, SSDLoss,
                                    hard_negative_mining, smooth_l1,
                                    ssd_anchors)
from tests import test_detection_reference as ref
from tests.test_detection_matcher import gt_batch

ANCHORS = ssd_anchors(96)
NUM_CLASSES = 5


def random_outputs(rng, batch=3, num_classes=NUM_CLASSES):
  return {
      'box_offsets': rng.normal(0, 1, (batch, len(ANCHORS), 4)).astype(
          np.float32),
      'class_logits': rng.normal(0, 2, (batch, len(ANCHORS),
                                        num_classes)).astype(np.float32)}


def loss_case(seed):
  rng = np.random.default_rng(seed)
  boxes, labels, mask = gt_batch(rng)
  labels = labels % (NUM_CLASSES - 1) + 1
  return random_outputs(rng, len(boxes)), boxes, labels, mask


CONFIGS = {
    'tf_coco': (TF_COCO_LOSS, {}),
    'tf_tpu_focal': (TF_TPU_FOCAL_LOSS,
                     dict(kind='focal', ratio=None, background_as_zeros=True,
                          loc_by_code_size=True)),
    'softmax': (SSDLoss(classification='softmax'), dict(kind='softmax')),
    'few_hard_examples': (SSDLoss(num_hard_examples=40, negatives_per_positive=
                                  2.5, min_negatives_per_image=3),
                          dict(num_hard=40, ratio=2.5, min_negatives=3)),
    'mining_nms': (SSDLoss(mining_nms_iou=0.3), dict(mining_nms_iou=0.3)),
}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_loss_matches_the_reference(name):
  loss_fn, ref_kwargs = CONFIGS[name]
  outputs, boxes, labels, mask = loss_case(0)
  loss, metrics = jax.jit(loss_fn)(outputs, ANCHORS, boxes, labels, mask)
  cls, loc, num_pos = ref.ssd_loss(outputs['box_offsets'],
                                   outputs['class_logits'], ANCHORS, boxes,
                                   labels, mask, **ref_kwargs)
  assert num_pos > 0
  np.testing.assert_allclose(metrics['classification_loss'], cls, rtol=2e-5)
  np.testing.assert_allclose(metrics['localization_loss'], loc, rtol=2e-5)
  np.testing.assert_allclose(loss, cls + loc, rtol=2e-5)
  np.testing.assert_allclose(metrics['positives_per_image'],
                             num_pos / len(boxes))
  assert loss.dtype == jnp.float32


def test_no_objects_anywhere_gives_zero_loss_by_default():
  outputs, boxes, labels, mask = loss_case(1)
  mask[:] = False
  loss, metrics = jax.jit(TF_COCO_LOSS)(outputs, ANCHORS, boxes, labels, mask)
  # No positives: no negatives are mined (min_negatives_per_image = 0).
  assert float(loss) == 0.0 and float(metrics['negatives_per_image']) == 0.0
  cls, _, _ = ref.ssd_loss(outputs['box_offsets'], outputs['class_logits'],
                           ANCHORS, boxes, labels, mask, ratio=None)
  loss, _ = jax.jit(SSDLoss(negatives_per_positive=None))(
      outputs, ANCHORS, boxes, labels, mask)
  np.testing.assert_allclose(loss, cls, rtol=2e-5)  # normalized by max(0, 1)


@pytest.mark.parametrize('seed', range(3))
def test_hard_negative_mining_matches_the_loop(seed):
  rng = np.random.default_rng(seed)
  # Quantized losses: ties broken by the lower anchor index.
  losses = rng.integers(0, 6, (4, 50)).astype(np.float32)
  kind = rng.integers(0, 3, (4, 50))  # 0 positive, 1 negative, 2 ignored
  positive, negative = kind == 0, kind == 1
  for num_hard, ratio, min_neg in [(3000, 3.0, 0), (20, 1.5, 2), (7, 3, 0)]:
    ours = jax.jit(lambda l, p, n: hard_negative_mining(
        l, p, n, negatives_per_positive=ratio, num_hard_examples=num_hard,
        min_negatives_per_image=min_neg))(losses, positive, negative)
    for b in range(4):
      order = sorted(range(50), key=lambda a: (-losses[b, a], a))[:num_hard]
      max_neg = max(min_neg, int(np.floor(ratio * positive[b, order].sum())))
      expected = np.zeros(50, bool)
      seen = 0
      for a in order:
        if positive[b, a]:
          expected[a] = True
        elif negative[b, a]:
          seen += 1
          expected[a] = seen <= max_neg
      np.testing.assert_array_equal(ours[b], expected)


def test_smooth_l1_by_hand():
  np.testing.assert_allclose(smooth_l1(jnp.array([0.5, -2.0, 1.0]), 0.0),
                             [0.125, 1.5, 0.5])


def test_gradients_are_finite_and_flow_to_both_heads():
  outputs, boxes, labels, mask = loss_case(2)
  grads = jax.jit(jax.grad(
      lambda o: TF_COCO_LOSS(o, ANCHORS, boxes, labels, mask)[0]))(outputs)
  for g in grads.values():
    assert np.isfinite(np.asarray(g)).all() and np.abs(g).sum() > 0


def test_bf16_outputs_are_accepted_and_the_loss_is_float32():
  outputs, boxes, labels, mask = loss_case(3)
  loss_fn = jax.jit(TF_COCO_LOSS)
  loss32, _ = loss_fn(outputs, ANCHORS, boxes, labels, mask)
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), outputs)
  loss16, _ = loss_fn(bf16, ANCHORS, boxes, labels, mask)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_loss_rejects_mismatched_shapes():
  outputs, boxes, labels, mask = loss_case(4)
  with pytest.raises(ValueError, match='same image size'):
    TF_COCO_LOSS(outputs, ssd_anchors(64), boxes, labels, mask)
  bad = dict(outputs, box_offsets=outputs['box_offsets'][..., :3])
  with pytest.raises(ValueError, match='box_offsets'):
    TF_COCO_LOSS(bad, ANCHORS, boxes, labels, mask)
  with pytest.raises(ValueError, match='batch, max_boxes'):
    TF_COCO_LOSS(outputs, ANCHORS, boxes, labels[:, :2], mask)
  with pytest.raises(ValueError, match='batch B'):
    TF_COCO_LOSS(outputs, ANCHORS, boxes[:2], labels[:2], mask[:2])


@pytest.mark.parametrize('kwargs,match', [
    (dict(classification='hinge'), 'classification'),
    (dict(classification='softmax', encode_background_as_zeros=True),
     'background'),
    (dict(negatives_per_positive=0), 'negatives_per_positive'),
    (dict(negatives_per_positive=None, mining_nms_iou=0.99), 'mining'),
])
def test_bad_loss_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SSDLoss(**kwargs)


def test_tpu_focal_preset_is_the_tf_config():
  # ssd_mobilenet_v1_300x300_coco14_sync.config.
  assert dataclasses.asdict(TF_TPU_FOCAL_LOSS) == dataclasses.asdict(SSDLoss(
      classification='focal', focal_alpha=0.75, focal_gamma=2.0,
      negatives_per_positive=None, normalize_loc_by_code_size=True,
      encode_background_as_zeros=True))
