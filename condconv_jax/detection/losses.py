"""The SSD loss: target assignment, per-anchor classification and
localization losses, hard negative mining, normalization by the matches.

A pure, jittable function of the model's raw outputs and padded ground
truth (`SSDLoss.__call__`), with the TF Object Detection API's definitions:

- Classification (`core/losses.py`): `WeightedSigmoidClassificationLoss`,
  sigmoid cross-entropy summed over all num_classes columns, background
  column 0 included, against a one-hot target whose column 0 is set for
  negatives (`meta_architectures/ssd_meta_arch.py`: unmatched_cls_target
  [1, 0, ..., 0]; with encode_background_as_zeros, all zeros);
  `WeightedSoftmaxClassificationLoss`, softmax cross-entropy over the
  columns; `SigmoidFocalClassificationLoss`, ce (1 - p_t)^gamma (alpha t +
  (1 - alpha)(1 - t)). Ignored anchors (between the matcher thresholds)
  weigh 0; negatives weigh 1 (negative_class_weight).
- Localization: `WeightedSmoothL1LocalizationLoss` (Huber, delta 1) summed
  over the 4 codes of positive anchors.
- Hard example mining (`HardExampleMiner` in `core/losses.py`, configured
  by `samples/configs/ssd_mobilenet_v1_coco.config`: 3000 hard examples,
  3 negatives per positive, loss type CLASSIFICATION, 0 minimum negatives):
  per image, the anchors are ranked by classification loss and the first
  3000 taken; of those, every positive and the first floor(3 x positives
  among them) negatives count, the rest of the anchors do not (for both
  losses: a positive cut from the ranking loses its localization loss
  too, as in TF). TF ranks by running NMS at IoU 0.99 over the decoded
  predicted boxes with the losses as scores; that only drops near-duplicate
  predictions (none at initialization: the closest anchors of the 300x300
  SSD overlap at IoU 0.95) and costs a sequential NMS over all anchors per
  image per step, so `mining_nms_iou` defaults to None (a plain ranking);
  0.99 gives TF's.
- Normalization (`ssd_meta_arch.py` `loss`): both sums are divided by
  max(1, positives in the whole batch); normalize_loc_loss_by_codesize
  divides the localization loss by 4 more.

`SSDLoss()` is the ssd_mobilenet_v1_coco.config loss; `TF_TPU_FOCAL_LOSS`
is `ssd_mobilenet_v1_300x300_coco14_sync.config`'s (focal alpha 0.75,
gamma 2, no mining, background encoded as zeros, localization normalized by
the code size; its -4.6 class bias is the model's class_bias_init).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from condconv_jax.detection.box_coder import TF_SCALE_FACTORS, decode_boxes
from condconv_jax.detection.matcher import assign_targets, check_ground_truth
from condconv_jax.detection.nms import non_max_suppression

CLASSIFICATION_LOSSES = ('sigmoid', 'softmax', 'focal')


def smooth_l1(predictions, targets, delta: float = 1.0):
  """Elementwise Huber loss of x = predictions - targets, as
  tf.losses.huber_loss: 0.5 x^2 for |x| <= delta, delta (|x| - 0.5 delta)
  beyond."""
  x = jnp.abs(predictions - targets)
  return jnp.where(x <= delta, 0.5 * x * x, delta * (x - 0.5 * delta))


def classification_targets(labels, num_classes: int,
                           background_as_zeros: bool = False):
  """labels [B, A] (0 for every non-positive anchor) -> one-hot targets
  [B, A, num_classes] float32; background_as_zeros clears column 0."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if background_as_zeros:
    return targets.at[..., 0].set(0.0)
  return targets


def classification_losses(logits, targets, kind: str = 'sigmoid',
                          focal_alpha: float = 0.75,
                          focal_gamma: float = 2.0):
  """Per-anchor classification loss, summed over the class columns.
  logits, targets: [B, A, C] -> [B, A] float32."""
  logits = logits.astype(jnp.float32)
  if kind == 'softmax':
    return optax.softmax_cross_entropy(logits, targets)
  ce = optax.sigmoid_binary_cross_entropy(logits, targets)
  if kind == 'focal':
    p = jax.nn.sigmoid(logits)
    p_t = targets * p + (1 - targets) * (1 - p)
    alpha = targets * focal_alpha + (1 - targets) * (1 - focal_alpha)
    ce = (1 - p_t) ** focal_gamma * alpha * ce
  return jnp.sum(ce, axis=-1)


def hard_negative_mining(cls_losses, positive, negative, *,
                         negatives_per_positive: float,
                         num_hard_examples: int | None = 3000,
                         min_negatives_per_image: int = 0,
                         candidates=None):
  """The anchors TF's HardExampleMiner keeps. -> selected [B, A] bool.

  cls_losses, positive, negative: [B, A]. Per image, the anchors in
  decreasing loss order (ties: lower index first) or, if given, the
  `candidates` ([B, K] anchor indices in that order, -1 = none) are cut to
  the first num_hard_examples; of these every positive is kept, and each
  negative while the running count of negatives is <= max(
  min_negatives_per_image, floor(negatives_per_positive x positives kept)).
  """
  losses = jax.lax.stop_gradient(cls_losses)
  num_anchors = losses.shape[-1]

  def one_image(loss, pos, neg, order):
    if order is None:
      order = jnp.argsort(-loss, stable=True)
    if num_hard_examples is not None:
      order = order[:num_hard_examples]
    real = order >= 0
    index = jnp.where(real, order, 0)
    pos_c = pos[index] & real
    neg_c = neg[index] & real
    num_pos = jnp.sum(pos_c)
    max_neg = jnp.maximum(min_negatives_per_image,
                          jnp.floor(negatives_per_positive * num_pos))
    keep = pos_c | (neg_c & (jnp.cumsum(neg_c) <= max_neg))
    # Scatter back to anchor order; padded candidates go out of bounds.
    return jnp.zeros((num_anchors,), bool).at[
        jnp.where(real, order, num_anchors)].set(keep, mode='drop')

  if candidates is None:
    return jax.vmap(lambda l, p, n: one_image(l, p, n, None))(
        losses, positive, negative)
  return jax.vmap(one_image)(losses, positive, negative, candidates)


@dataclasses.dataclass(frozen=True)
class SSDLoss:
  """The SSD training loss; defaults are ssd_mobilenet_v1_coco.config's.

  Call: `loss, metrics = SSDLoss()(outputs, anchors, gt_boxes, gt_labels,
  gt_mask)` with outputs the model's {'box_offsets': [B, A, 4],
  'class_logits': [B, A, C]} (column 0 background), anchors [A, 4],
  gt_boxes [B, G, 4], gt_labels [B, G] (1 .. C - 1), gt_mask [B, G].
  Returns the float32 scalar loss and float32 scalar metrics:
  classification_loss, localization_loss (each after normalization),
  positives_per_image and negatives_per_image (negatives that count after
  mining).
  """

  classification: str = 'sigmoid'
  focal_alpha: float = 0.75
  focal_gamma: float = 2.0
  negatives_per_positive: float | None = 3.0  # None: no hard mining
  num_hard_examples: int | None = 3000
  min_negatives_per_image: int = 0
  mining_nms_iou: float | None = None  # TF: 0.99; see the module docstring
  classification_weight: float = 1.0
  localization_weight: float = 1.0
  smooth_l1_delta: float = 1.0
  normalize_loc_by_code_size: bool = False
  encode_background_as_zeros: bool = False
  matched_threshold: float = 0.5
  unmatched_threshold: float = 0.5
  force_match: bool = True
  scale_factors: tuple[float, float, float, float] = TF_SCALE_FACTORS

  def __post_init__(self):
    if self.classification not in CLASSIFICATION_LOSSES:
      raise ValueError(f'classification must be one of '
                       f'{CLASSIFICATION_LOSSES}, got '
                       f'{self.classification!r}.')
    if self.classification == 'softmax' and self.encode_background_as_zeros:
      raise ValueError('softmax classification needs a background target: '
                       'encode_background_as_zeros must be False.')
    if self.negatives_per_positive is not None and (
        self.negatives_per_positive <= 0):
      raise ValueError(f'negatives_per_positive must be > 0 or None (no '
                       f'mining), got {self.negatives_per_positive}.')
    if self.mining_nms_iou is not None and self.negatives_per_positive is None:
      raise ValueError('mining_nms_iou needs hard mining '
                       '(negatives_per_positive).')

  def __call__(self, outputs, anchors, gt_boxes, gt_labels, gt_mask):
    box_offsets = jnp.asarray(outputs['box_offsets'], jnp.float32)
    logits = jnp.asarray(outputs['class_logits'], jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_labels = jnp.asarray(gt_labels)
    gt_mask = jnp.asarray(gt_mask)
    check_ground_truth(anchors, jnp.asarray(gt_boxes), gt_labels, gt_mask)
    batch, num_anchors = logits.shape[:2]
    if (logits.ndim != 3 or box_offsets.shape != (batch, num_anchors, 4) or
        anchors.shape[0] != num_anchors or gt_labels.shape[0] != batch):
      raise ValueError(
          f'expected class_logits [B, A, C], box_offsets [B, A, 4], anchors '
          f'[A, 4] and ground truth of batch B; got class_logits '
          f'{logits.shape}, box_offsets {box_offsets.shape}, anchors '
          f'{anchors.shape}, gt_labels {gt_labels.shape}. Anchors must come '
          f'from the same image size and anchor settings as the model.')

    targets = assign_targets(
        anchors, gt_boxes, gt_labels, gt_mask,
        matched_threshold=self.matched_threshold,
        unmatched_threshold=self.unmatched_threshold,
        force_match=self.force_match, scale_factors=self.scale_factors)
    positive, negative = targets.positive, targets.negative
    cls_targets = classification_targets(targets.labels, logits.shape[-1],
                                         self.encode_background_as_zeros)
    cls_losses = classification_losses(logits, cls_targets,
                                       self.classification, self.focal_alpha,
                                       self.focal_gamma)
    cls_losses = cls_losses * (positive | negative)  # ignored anchors: 0
    loc_losses = jnp.sum(smooth_l1(box_offsets, targets.box_targets,
                                   self.smooth_l1_delta), axis=-1) * positive

    if self.negatives_per_positive is None:
      counted = positive | negative
    else:
      candidates = None
      if self.mining_nms_iou is not None:
        candidates = self._nms_candidates(box_offsets, anchors, cls_losses)
      counted = hard_negative_mining(
          cls_losses, positive, negative,
          negatives_per_positive=self.negatives_per_positive,
          num_hard_examples=self.num_hard_examples,
          min_negatives_per_image=self.min_negatives_per_image,
          candidates=candidates)
    num_positives = jnp.sum(positive).astype(jnp.float32)
    normalizer = jnp.maximum(num_positives, 1.0)
    loc_normalizer = normalizer * (4.0 if self.normalize_loc_by_code_size
                                   else 1.0)
    cls_loss = (self.classification_weight *
                jnp.sum(cls_losses * counted) / normalizer)
    loc_loss = (self.localization_weight *
                jnp.sum(loc_losses * counted) / loc_normalizer)
    metrics = {
        'classification_loss': cls_loss,
        'localization_loss': loc_loss,
        'positives_per_image': num_positives / batch,
        'negatives_per_image': jnp.sum(counted & negative).astype(
            jnp.float32) / batch,
    }
    return cls_loss + loc_loss, metrics

  def _nms_candidates(self, box_offsets, anchors, cls_losses):
    """TF's mining order: NMS over the decoded predictions, losses as
    scores. -> [B, K] anchor indices, -1 after the survivors."""
    boxes = decode_boxes(jax.lax.stop_gradient(box_offsets), anchors,
                         self.scale_factors)
    max_outputs = boxes.shape[1]
    if self.num_hard_examples is not None:
      max_outputs = min(max_outputs, self.num_hard_examples)
    return jax.vmap(lambda b, s: non_max_suppression(
        b, s, max_outputs, self.mining_nms_iou)[0])(
            boxes, jax.lax.stop_gradient(cls_losses))


TF_COCO_LOSS = SSDLoss()
TF_TPU_FOCAL_LOSS = SSDLoss(classification='focal', negatives_per_positive=None,
                            normalize_loc_by_code_size=True,
                            encode_background_as_zeros=True)
