"""Tiled detection (stitching by tile cores) and deepforest's box precision
and recall, against brute force."""

import itertools

import numpy as np
import pytest

from condconv_jax.detection import box_match, tiles


@pytest.mark.parametrize('size,tile,overlap', [(400, 192, 80), (400, 256, 80),
                                               (400, 400, 80), (333, 100, 30)])
def test_tiles_cover_the_image_overlapping_and_cores_partition_it(
    size, tile, overlap):
  windows, cores = tiles.tile_layout(size, tile, overlap)
  starts = tiles.tile_starts(size, tile, overlap)
  assert starts[0] == 0 and starts[-1] + min(tile, size) == size
  if len(starts) > 1:
    assert np.all(np.diff(starts) <= tile - overlap)
    # the fewest: one tile fewer would overlap by less
    fewer = np.linspace(0, size - tile, len(starts) - 1)
    assert len(fewer) < 2 or np.diff(fewer).max() > tile - overlap
  # every pixel centre lies in exactly one core, and that core's window
  centres = (np.arange(size) + 0.5) / size
  y, x = np.meshgrid(centres, centres, indexing='ij')
  points = np.stack([y, x, y, x], -1).reshape(-1, 4)
  owners = np.stack([tiles.in_core(points, core) for core in cores], 1)
  assert np.all(owners.sum(1) == 1)
  owner = owners.argmax(1)
  inside = ((points[:, 0] >= windows[owner, 0]) &
            (points[:, 0] <= windows[owner, 2]) &
            (points[:, 1] >= windows[owner, 1]) &
            (points[:, 1] <= windows[owner, 3]))
  assert inside.all()


def test_an_object_within_the_overlap_is_whole_in_the_tile_keeping_it():
  size, tile, overlap = 400, 192, 80
  windows, cores = tiles.tile_layout(size, tile, overlap)
  rng = np.random.default_rng(0)
  for _ in range(500):
    side = rng.uniform(5, overlap)
    y, x = rng.uniform(0, size - side, 2)
    box = np.array([y, x, y + side, x + side]) / size
    keeper = [k for k in range(len(cores)) if tiles.in_core(box, cores[k])]
    assert len(keeper) == 1
    w = windows[keeper[0]]
    assert (box[:2] >= w[:2] - 1e-12).all() and (box[2:] <= w[2:] + 1e-12).all()


def test_stitching_maps_tile_boxes_into_the_image_and_keeps_core_centres():
  # two tiles of a 1-D split: left [0, 0.6], right [0.4, 1]; core cut 0.5
  window_left, window_right = [0, 0, 1, 0.6], [0, 0.4, 1, 1.0]
  core_left, core_right = [0, 0, np.inf, 0.5], [0, 0.5, np.inf, np.inf]
  # in the left tile: a box centred at x = 0.3 (kept), one at 0.54 (not)
  left = (np.array([[0.1, 0.4, 0.2, 0.6], [0.1, 0.85, 0.2, 0.95]]),
          np.array([0.9, 0.8]), np.array([1, 1]), window_left, core_left)
  # in the right tile: the same object seen larger, centre 0.58 (kept)
  right = (np.array([[0.1, 0.2, 0.2, 0.4]]), np.array([0.7]),
           np.array([1]), window_right, core_right)
  boxes, scores, classes = tiles.stitch([left, right])
  np.testing.assert_allclose(boxes, [[0.1, 0.24, 0.2, 0.36],
                                     [0.1, 0.52, 0.2, 0.64]])
  np.testing.assert_allclose(scores, [0.9, 0.7])
  np.testing.assert_array_equal(classes, [1, 1])


def _brute_force_true_positives(gt, dt, iou_threshold):
  """Every one-to-one assignment; the one of largest total intersection
  (deepforest's linear_sum_assignment), then IoU > threshold."""
  def inter_union(a, b):
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) -
             inter)
    return inter, union
  best, best_hits = -1.0, 0
  n, m = len(gt), len(dt)
  small, large = (gt, dt) if n <= m else (dt, gt)
  for perm in itertools.permutations(range(len(large)), len(small)):
    pairs = [(small[i], large[j]) for i, j in enumerate(perm)]
    total = sum(inter_union(a, b)[0] for a, b in pairs)
    if total > best + 1e-12:
      best = total
      best_hits = sum(inter_union(a, b)[0] / inter_union(a, b)[1] >
                      iou_threshold for a, b in pairs)
  return best_hits


def test_true_positives_equal_the_best_assignment_by_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(60):
    n, m = rng.integers(1, 6, 2)
    centres = rng.uniform(20, 80, (n, 2))
    gt = np.concatenate([centres - 8, centres + 8], 1)
    # detections near some crowns, plus strays
    near = gt[rng.integers(0, n, m)] + rng.normal(0, 4, (m, 4))
    dt = np.concatenate([np.minimum(near[:, :2], near[:, 2:]),
                         np.maximum(near[:, :2], near[:, 2:]) + 1], 1)
    assert (box_match.true_positives(gt, dt) ==
            _brute_force_true_positives(gt, dt, 0.4))


def test_precision_recall_follow_deepforests_conventions():
  gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
  # image 1: one exact hit, one stray; image 2: nothing over threshold
  images = [(gt, np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float),
             np.array([0.9, 0.8])),
            (gt, np.array([[20, 20, 30, 30]], float), np.array([0.1])),
            (np.zeros((0, 4)), np.array([[0, 0, 5, 5]], float),
             np.array([0.9]))]  # no ground truth: not scored
  precision, recall = box_match.precision_recall(images, 0.5)
  assert precision == pytest.approx(0.5)  # image 2 has no precision
  assert recall == pytest.approx((0.5 + 0.0) / 2)
  precision, recall = box_match.precision_recall(images, 0.05)
  assert precision == pytest.approx((0.5 + 1.0) / 2)
  assert recall == pytest.approx((0.5 + 0.5) / 2)
  # IoU exactly 0.4 is not a match (deepforest: IoU > threshold)
  shifted = np.array([[0, 0, 10, 10 * 0.4 / 1.0]], float)  # IoU 0.4
  assert box_match.true_positives(gt[:1], shifted) == 0


def test_the_curve_and_its_best_f1_threshold():
  gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
  boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]],
                   float)
  curve = box_match.curve([(gt, boxes, np.array([0.9, 0.5, 0.7]))],
                          thresholds=[0.1, 0.6, 0.8, 0.95])
  np.testing.assert_allclose(curve['recall'], [1, 0.5, 0.5, 0])
  np.testing.assert_allclose(curve['precision'][:3], [2 / 3, 0.5, 1])
  assert np.isnan(curve['precision'][3]) and curve['f1'][3] == 0
  assert box_match.best_f1_threshold(curve) == 0.1
