"""What the detection datasets (COCO, DeepForest) share: the crop rule for
ground-truth boxes and the SSD input scaling.

Both datasets yield the same batch layout (boxes normalized [ymin, xmin,
ymax, xmax], padded to a fixed count G with a mask), described in
`condconv_jax.training.coco` and `condconv_jax.training.deepforest`.
"""

from __future__ import annotations

import numpy as np

from condconv_jax.training import data

# The TF Object Detection API's SSD input scaling, (2 / 255) x - 1
# (`models/ssd_mobilenet_v1_feature_extractor.py` `preprocess`).
SSD_NORMALIZATION = data.Normalization((127.5,) * 3, (127.5,) * 3)


def crop_boxes(boxes, window, min_overlap, xp=np):
  """Ground truth of a crop: the TF Object Detection API's rule.

  `core/preprocessor.py` `_strict_random_crop_image` with
  `core/box_list_ops.py`: a box is dropped when it lies completely outside
  the window (`prune_completely_outside_window`: touching an edge counts as
  outside) or when the fraction of its own area inside the window, its
  intersection over area (IoA), is below `min_overlap`
  (`prune_non_overlapping_boxes`); the kept boxes move to the window's frame
  (`change_coordinate_frame`) and are clipped to [0, 1]. A box of zero area
  has IoA 0 / 0 = NaN in TF, which fails every threshold: it is dropped.

  boxes: [N, 4] [ymin, xmin, ymax, xmax]; window: [4] in the same units
  (normalized or pixels); min_overlap: scalar. xp: numpy, or
  tf.experimental.numpy inside a tf.data pipeline (one rule, two callers).
  Returns (boxes [N, 4] in the window's normalized frame, clipped to [0, 1];
  keep [N] bool). Rows where keep is False are meaningless.
  """
  ymin, xmin, ymax, xmax = (boxes[:, i] for i in range(4))
  wy0, wx0, wy1, wx1 = (window[i] for i in range(4))
  height = xp.minimum(ymax, wy1) - xp.maximum(ymin, wy0)
  width = xp.minimum(xmax, wx1) - xp.maximum(xmin, wx0)
  area = (ymax - ymin) * (xmax - xmin)
  # inter / area >= t written as inter >= t * area: no 0 / 0 for degenerate
  # boxes, which the area > 0 term drops as TF's NaN does.
  keep = ((height > 0) & (width > 0) & (area > 0) &
          (height * width >= min_overlap * area))
  win_h, win_w = wy1 - wy0, wx1 - wx0
  framed = xp.stack([(ymin - wy0) / win_h, (xmin - wx0) / win_w,
                     (ymax - wy0) / win_h, (xmax - wx0) / win_w], axis=1)
  return xp.clip(framed, 0.0, 1.0), keep
