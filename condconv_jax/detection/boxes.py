"""Box geometry on normalized [ymin, xmin, ymax, xmax] boxes, and the checks
that keep bad boxes out.

Every box inside `condconv_jax.detection` is [ymin, xmin, ymax, xmax] in
[0, 1] image coordinates (the TF Object Detection API's convention,
`core/box_list.py`). What is checked where:

- shapes and ranks: statically, by every public function, at trace time
  (`check_boxes`), so a wrong rank fails before anything runs;
- values (ymin > ymax, coordinates outside [0, 1] such as pixel coordinates,
  labels out of range, NaN): on the host by `validate_ground_truth`, which a
  data pipeline calls on each batch before it is sent to the device. Under
  `jit` values are abstract, so the jitted functions cannot raise on them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def check_boxes(boxes, name: str, rank: int | None = None):
  """Static check that `boxes` is [..., 4] (of `rank` if given)."""
  shape = np.shape(boxes)
  if len(shape) < 1 or shape[-1] != 4:
    raise ValueError(f'{name} must end in a dimension of 4 [ymin, xmin, ymax, '
                     f'xmax], got shape {tuple(shape)}.')
  if rank is not None and len(shape) != rank:
    raise ValueError(f'{name} must have rank {rank}, got shape '
                     f'{tuple(shape)}.')


def area(boxes):
  """boxes: [..., 4] -> [...] (negative for inverted boxes; see
  validate_ground_truth)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def iou(boxes1, boxes2):
  """Pairwise intersection over union: [..., N, 4], [..., M, 4] -> [..., N, M].

  As TF's `core/box_list_ops.py` `iou`: where the intersection is 0 the IoU
  is 0, so two zero-area boxes never divide by zero.
  """
  boxes1 = jnp.asarray(boxes1, jnp.float32)
  boxes2 = jnp.asarray(boxes2, jnp.float32)
  b1 = boxes1[..., :, None, :]
  b2 = boxes2[..., None, :, :]
  height = jnp.maximum(
      jnp.minimum(b1[..., 2], b2[..., 2]) - jnp.maximum(b1[..., 0], b2[..., 0]),
      0.0)
  width = jnp.maximum(
      jnp.minimum(b1[..., 3], b2[..., 3]) - jnp.maximum(b1[..., 1], b2[..., 1]),
      0.0)
  intersection = height * width
  union = area(b1) + area(b2) - intersection
  safe_union = jnp.where(intersection > 0, union, 1.0)
  return jnp.where(intersection > 0, intersection / safe_union, 0.0)


def clip_boxes(boxes, window=(0.0, 0.0, 1.0, 1.0)):
  """Clips [..., 4] boxes to `window` [ymin, xmin, ymax, xmax] (TF's
  `box_list_ops.clip_to_window`)."""
  ymin, xmin, ymax, xmax = window
  lo = jnp.asarray([ymin, xmin, ymin, xmin], boxes.dtype)
  hi = jnp.asarray([ymax, xmax, ymax, xmax], boxes.dtype)
  return jnp.clip(boxes, lo, hi)


def validate_ground_truth(boxes, labels, mask, num_classes: int,
                          atol: float = 1e-6):
  """Host-side check of a padded ground-truth batch; raises ValueError.

  boxes: [B, G, 4] normalized [ymin, xmin, ymax, xmax]; labels: [B, G] int,
  foreground classes 1 .. num_classes - 1 (0 is background, the class
  column the model reserves); mask: [B, G], True for real boxes. Padded
  entries (mask False) may hold anything finite or not.

  Checks: ranks and matching shapes; for real boxes, finite coordinates in
  [0, 1] (pixel coordinates are the usual mistake), ymin <= ymax and
  xmin <= xmax, integer labels in range. `atol` tolerates rounding at the
  image border.
  """
  boxes = np.asarray(boxes)
  labels = np.asarray(labels)
  mask = np.asarray(mask)
  check_boxes(boxes, 'gt_boxes', rank=3)
  if labels.shape != boxes.shape[:2] or mask.shape != boxes.shape[:2]:
    raise ValueError(f'gt_labels and gt_mask must be [batch, max_boxes] = '
                     f'{boxes.shape[:2]} like gt_boxes {boxes.shape}; got '
                     f'labels {labels.shape}, mask {mask.shape}.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'gt_labels must be integers, got dtype {labels.dtype}.')
  if not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
    raise ValueError('gt_mask must be boolean (True = a real box, False = '
                     'padding).')
  mask = mask.astype(bool)
  real = boxes[mask]
  where = np.argwhere(mask)
  if not np.isfinite(real).all():
    b, g = where[np.argwhere(~np.isfinite(real).all(-1))[0, 0]]
    raise ValueError(f'gt_boxes[{b}, {g}] = {boxes[b, g]} is not finite.')
  outside = ((real < -atol) | (real > 1 + atol)).any(-1)
  if outside.any():
    b, g = where[np.argmax(outside)]
    raise ValueError(f'gt_boxes[{b}, {g}] = {boxes[b, g]} lies outside [0, 1]: '
                     f'boxes must be normalized [ymin, xmin, ymax, xmax] '
                     f'(divide pixel coordinates by the image height and '
                     f'width) and clipped to the image.')
  inverted = (real[:, 0] > real[:, 2]) | (real[:, 1] > real[:, 3])
  if inverted.any():
    b, g = where[np.argmax(inverted)]
    raise ValueError(f'gt_boxes[{b}, {g}] = {boxes[b, g]} has ymin > ymax or '
                     f'xmin > xmax: boxes must be [ymin, xmin, ymax, xmax] '
                     f'(not [xmin, ymin, ...] or [y, x, height, width]).')
  real_labels = labels[mask]
  bad = (real_labels < 1) | (real_labels >= num_classes)
  if bad.any():
    b, g = where[np.argmax(bad)]
    raise ValueError(f'gt_labels[{b}, {g}] = {labels[b, g]} is out of range: '
                     f'foreground labels are 1 .. {num_classes - 1} '
                     f'(num_classes = {num_classes} counts the background '
                     f'column 0).')
