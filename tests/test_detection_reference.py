"""Float64 NumPy references for the detection tests, written from the TF
Object Detection API's definitions with explicit loops and no JAX, and
checked here on hand-computed cases.

Sources: anchor_generators/multiple_grid_anchor_generator.py
(create_ssd_anchors) and grid_anchor_generator.py (tile_anchors);
box_coders/faster_rcnn_box_coder.py; core/box_list_ops.py (iou);
matchers/argmax_matcher.py; core/target_assigner.py; core/losses.py
(sigmoid, softmax, focal, smooth L1, HardExampleMiner);
meta_architectures/ssd_meta_arch.py (loss, normalization);
core/post_processing.py (multiclass NMS).
"""

import math

import numpy as np


def tf_anchors(image_size, sizes, min_scale=0.2, max_scale=0.95,
               aspect_ratios=(1.0, 2.0, 0.5, 3.0, 0.3333),
               interpolated_scale_aspect_ratio=1.0,
               reduce_boxes_in_lowest_layer=True, scales=None):
  """create_ssd_anchors + MultipleGridAnchorGenerator._generate, a loop per
  layer, cell and box."""
  height, width = image_size
  num_layers = len(sizes)
  if not scales:
    scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1)
              for i in range(num_layers)]
  scales = list(scales) + [1.0]
  min_dim = min(height, width)
  base = (min_dim / height, min_dim / width)
  out = []
  for layer in range(num_layers):
    scale, scale_next = scales[layer], scales[layer + 1]
    if layer == 0 and reduce_boxes_in_lowest_layer:
      specs = [(0.1, 1.0), (scale, 2.0), (scale, 0.5)]
    else:
      specs = [(scale, a) for a in aspect_ratios]
      if interpolated_scale_aspect_ratio > 0:
        specs.append((math.sqrt(scale * scale_next),
                      interpolated_scale_aspect_ratio))
    grid_h, grid_w = sizes[layer]
    stride = (1.0 / grid_h, 1.0 / grid_w)
    offset = (0.5 * stride[0], 0.5 * stride[1])
    for y in range(grid_h):
      for x in range(grid_w):
        cy, cx = y * stride[0] + offset[0], x * stride[1] + offset[1]
        for s, a in specs:
          h = s / math.sqrt(a) * base[0]
          w = s * math.sqrt(a) * base[1]
          out.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
  return np.array(out, np.float64)


def iou(boxes1, boxes2):
  """box_list_ops.iou, one pair at a time."""
  out = np.zeros((len(boxes1), len(boxes2)))
  for i, a in enumerate(np.asarray(boxes1, np.float64)):
    for j, b in enumerate(np.asarray(boxes2, np.float64)):
      ih = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
      iw = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
      inter = ih * iw
      union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
               - inter)
      out[i, j] = 0.0 if inter == 0 else inter / union
  return out


def encode(box, anchor, scales=(10.0, 10.0, 5.0, 5.0)):
  """FasterRcnnBoxCoder._encode for one box."""
  eps = 1e-8
  ha, wa = anchor[2] - anchor[0], anchor[3] - anchor[1]
  ya, xa = anchor[0] + ha / 2, anchor[1] + wa / 2
  h, w = box[2] - box[0], box[3] - box[1]
  y, x = box[0] + h / 2, box[1] + w / 2
  ha, wa, h, w = ha + eps, wa + eps, h + eps, w + eps
  return np.array([scales[0] * (y - ya) / ha, scales[1] * (x - xa) / wa,
                   scales[2] * math.log(h / ha), scales[3] * math.log(w / wa)])


def decode(code, anchor, scales=(10.0, 10.0, 5.0, 5.0)):
  """FasterRcnnBoxCoder._decode for one box."""
  ha, wa = anchor[2] - anchor[0], anchor[3] - anchor[1]
  ya, xa = anchor[0] + ha / 2, anchor[1] + wa / 2
  y = code[0] / scales[0] * ha + ya
  x = code[1] / scales[1] * wa + xa
  h = math.exp(code[2] / scales[2]) * ha
  w = math.exp(code[3] / scales[3]) * wa
  return np.array([y - h / 2, x - w / 2, y + h / 2, x + w / 2])


def argmax_match(sim, valid, matched=0.5, unmatched=0.5, force=True):
  """ArgMaxMatcher._match over the real rows, loop per column and row."""
  rows = [g for g in range(sim.shape[0]) if valid[g]]
  num_anchors = sim.shape[1]
  match = np.full(num_anchors, -1)
  if not rows:
    return match
  for a in range(num_anchors):
    best_g, best = rows[0], sim[rows[0], a]
    for g in rows[1:]:
      if sim[g, a] > best:  # first maximum wins
        best_g, best = g, sim[g, a]
    if best >= matched:
      match[a] = best_g
    elif best >= unmatched:
      match[a] = -2
  if force:
    forced = {}
    for g in rows:
      best_a = int(np.argmax(sim[g]))  # first maximum
      forced.setdefault(best_a, g)  # the first row forcing a column wins
    for a, g in forced.items():
      match[a] = g
  return match


def greedy_nms(boxes, scores, iou_threshold, max_outputs,
               score_threshold=-np.inf):
  """Plain greedy NMS: decreasing score, lower index first on ties."""
  order = sorted((i for i in range(len(scores))
                  if scores[i] > score_threshold),
                 key=lambda i: (-scores[i], i))
  keep = []
  for i in order:
    if len(keep) == max_outputs:
      break
    if all(iou(boxes[i:i + 1], boxes[k:k + 1])[0, 0] <= iou_threshold
           for k in keep):
      keep.append(i)
  return keep


def tf_multiclass_nms(boxes, scores, iou_threshold, score_threshold,
                      max_per_class, max_total):
  """multiclass_non_max_suppression: NMS per class, merge, sort, cut.
  -> list of (box index, class index, score)."""
  merged = []
  for c in range(scores.shape[1]):
    for i in greedy_nms(boxes, scores[:, c], iou_threshold, max_per_class,
                        score_threshold):
      merged.append((i, c, scores[i, c]))
  merged.sort(key=lambda t: -t[2])
  return merged[:max_total]


def sigmoid_ce(logit, target):
  return max(logit, 0) - logit * target + math.log1p(math.exp(-abs(logit)))


def ssd_loss(box_offsets, logits, anchors, gt_boxes, gt_labels, gt_mask, *,
             kind='sigmoid', alpha=0.75, gamma=2.0, ratio=3.0,
             num_hard=3000, min_negatives=0, background_as_zeros=False,
             loc_by_code_size=False, mining_nms_iou=None):
  """SSDMetaArch.loss with TargetAssigner, the losses and HardExampleMiner,
  one anchor at a time. -> (cls_loss, loc_loss, num_positives)."""
  batch, num_anchors, num_classes = logits.shape
  total_cls = total_loc = 0.0
  num_pos_batch = 0
  for b in range(batch):
    sim = iou(gt_boxes[b], anchors) if len(gt_boxes[b]) else np.zeros(
        (0, num_anchors))
    match = argmax_match(sim, gt_mask[b])
    cls_l = np.zeros(num_anchors)
    loc_l = np.zeros(num_anchors)
    for a in range(num_anchors):
      target = np.zeros(num_classes)
      if match[a] >= 0:
        target[gt_labels[b, match[a]]] = 1.0
      elif match[a] == -1 and not background_as_zeros:
        target[0] = 1.0
      if match[a] == -2:
        continue  # ignored: weight 0
      z = logits[b, a].astype(np.float64)
      if kind == 'softmax':
        m = z.max()
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        cls_l[a] = -sum(t * (v - lse) for t, v in zip(target, z))
      else:
        for c in range(num_classes):
          ce = sigmoid_ce(z[c], target[c])
          if kind == 'focal':
            p = 1 / (1 + math.exp(-z[c]))
            p_t = target[c] * p + (1 - target[c]) * (1 - p)
            w = target[c] * alpha + (1 - target[c]) * (1 - alpha)
            ce *= (1 - p_t) ** gamma * w
          cls_l[a] += ce
      if match[a] >= 0:
        code = encode(gt_boxes[b, match[a]], anchors[a])
        for d in range(4):
          x = abs(float(box_offsets[b, a, d]) - code[d])
          loc_l[a] += 0.5 * x * x if x <= 1.0 else x - 0.5
    positive = match >= 0
    negative = match == -1
    num_pos_batch += int(positive.sum())
    if ratio is None:
      keep = positive | negative
    else:
      if mining_nms_iou is None:
        order = sorted(range(num_anchors), key=lambda a: (-cls_l[a], a))
        order = order[:num_hard]
      else:
        decoded = np.array([decode(box_offsets[b, a], anchors[a])
                            for a in range(num_anchors)])
        order = greedy_nms(decoded, cls_l, mining_nms_iou,
                           min(num_hard, num_anchors))
      num_pos = sum(positive[a] for a in order)
      max_neg = max(min_negatives, int(math.floor(ratio * num_pos)))
      keep = np.zeros(num_anchors, bool)
      negatives_seen = 0
      for a in order:
        if positive[a]:
          keep[a] = True
        elif negative[a]:
          negatives_seen += 1
          if negatives_seen <= max_neg:
            keep[a] = True
    total_cls += cls_l[keep].sum()
    total_loc += loc_l[keep].sum()
  normalizer = max(num_pos_batch, 1)
  loc = total_loc / (normalizer * (4 if loc_by_code_size else 1))
  return total_cls / normalizer, loc, num_pos_batch


# The references on hand-computed cases.


def test_reference_iou_by_hand():
  a = [[0.0, 0.0, 0.5, 0.5]]
  b = [[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]
  # 0.0625 / (0.25 + 0.25 - 0.0625); touching corners; identical.
  np.testing.assert_allclose(iou(a, b), [[1 / 7, 0.0, 1.0]])


def test_reference_coder_by_hand():
  anchor = np.array([0.2, 0.2, 0.6, 0.4])  # center (0.4, 0.3), 0.4 x 0.2
  box = np.array([0.3, 0.2, 0.7, 0.6])  # center (0.5, 0.4), 0.4 x 0.4
  np.testing.assert_allclose(encode(box, anchor),
                             [10 * 0.1 / 0.4, 10 * 0.1 / 0.2, 0.0,
                              5 * math.log(2)], rtol=1e-6)
  np.testing.assert_allclose(decode(encode(box, anchor), anchor), box,
                             atol=1e-7)


def test_reference_matcher_by_hand():
  sim = np.array([[0.7, 0.2, 0.45, 0.1],
                  [0.6, 0.3, 0.2, 0.05]])
  # Column 0: row 0 (0.7); 1 and 3 below 0.5; 2: 0.45 between -> with
  # unmatched 0.4 ignored. Force: row 0's best is column 0, row 1's best is
  # column 0 too -> row 0 keeps it; row 1 gets nothing.
  np.testing.assert_array_equal(argmax_match(sim, [True, True], 0.5, 0.4),
                                [0, -1, -2, -1])
  # Row 1 alone: its best column 0 is forced (0.6 matches anyway), column 1
  # (0.3) stays negative.
  np.testing.assert_array_equal(argmax_match(sim, [False, True]),
                                [1, -1, -1, -1])


def test_reference_nms_by_hand():
  boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 0.9], [0, 0, 0.5, 0.5],
                    [0.5, 0.5, 1, 1]], np.float64)
  scores = np.array([0.9, 0.8, 0.7, 0.7])
  # Box 1 overlaps box 0 at IoU 0.9; boxes 2, 3 overlap box 0 at 0.25.
  assert greedy_nms(boxes, scores, 0.5, 10) == [0, 2, 3]
  assert greedy_nms(boxes, scores, 0.95, 2) == [0, 1]
