"""COCO metrics: CocoEvaluator against pycocotools run directly on JSON
files, and against APs computed by hand."""

import json

import numpy as np
import pytest

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from condconv_jax.training import coco_eval

# COCOeval interpolates precision at the 101 recall levels 0, .01, ..., 1:
# a detector that finds half of the objects with precision p everywhere up
# to recall .5 scores p * 51 / 101 (levels 0 .. .50).
HALF_RECALL = 51 / 101


def pycocotools_stats(tmp_path, ground_truth, detections):
  """pycocotools on files, as its own examples run it."""
  gt_file, dt_file = tmp_path / 'gt.json', tmp_path / 'dt.json'
  gt_file.write_text(json.dumps(ground_truth))
  dt_file.write_text(json.dumps(detections))
  gt = COCO(str(gt_file))
  e = COCOeval(gt, gt.loadRes(str(dt_file)), 'bbox')
  e.evaluate()
  e.accumulate()
  e.summarize()
  return dict(zip(coco_eval.METRICS, map(float, e.stats)))


def image(image_id, height, width, gt=(), dets=()):
  """An image with ground truth (x, y, w, h, category, area or None,
  iscrowd) and detections (x, y, w, h, category, score) in pixels."""
  return {'id': image_id, 'height': height, 'width': width,
          'gt': list(gt), 'dets': list(dets)}


def to_json(images):
  """The hand-made images as COCO JSON (the independent side)."""
  annotations, detections, categories = [], [], set()
  for im in images:
    for x, y, w, h, cat, area, crowd in im['gt']:
      annotations.append({'id': len(annotations) + 1, 'image_id': im['id'],
                          'bbox': [x, y, w, h], 'category_id': cat,
                          'area': w * h if area is None else area,
                          'iscrowd': crowd})
      categories.add(cat)
    for x, y, w, h, cat, score in im['dets']:
      detections.append({'image_id': im['id'], 'bbox': [x, y, w, h],
                         'category_id': cat, 'score': score})
      categories.add(cat)
  ground_truth = {'images': [{'id': im['id'], 'height': im['height'],
                              'width': im['width']} for im in images],
                  'annotations': annotations,
                  'categories': [{'id': c} for c in sorted(categories)]}
  return ground_truth, detections


def to_batch(images, pad_to=None, g=6, d=5, dtype=np.float32):
  """The same images as the padded arrays the evaluator receives."""
  b = pad_to or len(images)
  rng = np.random.default_rng(0)
  # Padding rows hold garbage: the masks alone must exclude them.
  batch = {
      'boxes': rng.random((b, d, 4)).astype(dtype),
      'scores': rng.random((b, d)).astype(dtype),
      'classes': rng.integers(1, 91, (b, d)), 'count': np.full(b, d),
      'mask': np.zeros(b, bool), 'image_id': np.arange(b) + 1000,
      'image_size': np.full((b, 2), 100),
      'gt_boxes': rng.random((b, g, 4)).astype(dtype),
      'gt_labels': rng.integers(1, 91, (b, g)),
      'gt_mask': np.zeros((b, g), bool),
      'gt_area': rng.random((b, g)).astype(dtype) * 1e4,
      'gt_crowd': rng.random((b, g)) < 0.5}
  for i, im in enumerate(images):
    h, w = im['height'], im['width']
    batch['mask'][i] = True
    batch['image_id'][i] = im['id']
    batch['image_size'][i] = (h, w)
    batch['gt_mask'][i] = np.arange(g) < len(im['gt'])
    for j, (x, y, bw, bh, cat, area, crowd) in enumerate(im['gt']):
      batch['gt_boxes'][i, j] = (y / h, x / w, (y + bh) / h, (x + bw) / w)
      batch['gt_labels'][i, j] = cat
      batch['gt_area'][i, j] = bw * bh if area is None else area
      batch['gt_crowd'][i, j] = crowd
    batch['count'][i] = len(im['dets'])
    for j, (x, y, bw, bh, cat, score) in enumerate(im['dets']):
      batch['boxes'][i, j] = (y / h, x / w, (y + bh) / h, (x + bw) / w)
      batch['classes'][i, j] = cat
      batch['scores'][i, j] = score
  return batch


def evaluator_stats(images, **kwargs):
  evaluator = coco_eval.CocoEvaluator()
  evaluator.add(to_batch(images, **kwargs))
  return evaluator.result()


def perfect_images():
  """Three images, objects of three categories in the three size ranges
  (areas 30x20 = 600 small, 60x40 = 2400 medium, 150x100 large), a crowd
  region nobody detects, detections exactly on the other boxes."""
  objects = {1: [(10, 10, 30, 20, 1, None, 0), (200, 100, 60, 40, 18, None, 0),
                 (300, 200, 150, 100, 1, None, 0)],
             2: [(5, 5, 60, 40, 90, None, 0), (100, 50, 150, 100, 90, None, 0),
                 (20, 150, 100, 80, 1, None, 1)],
             3: [(50, 60, 30, 20, 18, None, 0)]}
  scores = iter(np.linspace(0.9, 0.3, 8))
  return [image(i, 480, 640 - 100 * i, gt,
                [(*o[:5], float(next(scores))) for o in gt if not o[6]])
          for i, gt in objects.items()]


def moved_box_images(moved_score):
  """Two 40 x 40 objects; the detection of the second is moved 20 px right,
  IoU 800 / 2400 = 1/3 < .5 at every COCO threshold."""
  return [image(7, 300, 400,
                [(10, 10, 40, 40, 3, None, 0), (100, 100, 40, 40, 3, None, 0)],
                [(10, 10, 40, 40, 3, 0.9), (120, 100, 40, 40, 3, moved_score)])]


def test_perfect_detections_score_one(tmp_path):
  images = perfect_images()
  stats = evaluator_stats(images)
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100'):
    assert stats[name] == pytest.approx(1.0), name
  assert stats['count'] == 3
  assert stats == pytest.approx({**pycocotools_stats(tmp_path,
                                                     *to_json(images)),
                                 'count': 3})


@pytest.mark.parametrize('moved_score,precision', [(0.8, 1.0), (0.95, 0.5)])
def test_a_box_moved_below_iou_half_costs_the_hand_computed_ap(
    tmp_path, moved_score, precision):
  """The moved detection is a false positive at every IoU threshold and its
  object is missed: recall stops at .5. Ranked below the hit, precision is
  1 up to recall .5; ranked above it, the envelope is 1/2 there."""
  images = moved_box_images(moved_score)
  stats = evaluator_stats(images)
  for name in ('AP', 'AP50', 'AP75', 'APm'):
    assert stats[name] == pytest.approx(precision * HALF_RECALL), name
  assert stats['AR100'] == pytest.approx(0.5)
  assert stats['APs'] == stats['APl'] == -1.0  # no such objects
  assert stats == pytest.approx({**pycocotools_stats(tmp_path,
                                                     *to_json(images)),
                                 'count': 1})


def test_evaluator_equals_pycocotools_on_random_images(tmp_path):
  rng = np.random.default_rng(1)
  images = []
  for i in range(6):
    h, w = rng.integers(200, 640, 2)
    gt = []
    for _ in range(rng.integers(0, 6)):
      x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
      bw, bh = rng.uniform(5, w - x), rng.uniform(5, h - y)
      gt.append((x, y, bw, bh, int(rng.choice([1, 5, 44])),
                 float(bw * bh * rng.uniform(0.4, 1)), int(rng.random() < .1)))
    # Detections: jittered ground truth and some strays.
    dets = [(x + rng.normal(0, 4), y + rng.normal(0, 4), bw, bh, cat,
             float(rng.random())) for x, y, bw, bh, cat, _, _ in gt]
    dets += [(rng.uniform(0, w / 2), rng.uniform(0, h / 2), 30.0, 30.0,
              int(rng.choice([1, 5, 44])), float(rng.random()))
             for _ in range(rng.integers(0, 3))]
    images.append(image(100 + i, int(h), int(w), gt, dets))
  stats = evaluator_stats(images, g=8, d=8, dtype=np.float64)
  direct = pycocotools_stats(tmp_path, *to_json(images))
  assert 0 < direct['AP'] < 1
  assert stats == pytest.approx({**direct, 'count': 6}, abs=1e-12)
  # The JSON-level function is the same computation.
  assert coco_eval.evaluate(*to_json(images)) == pytest.approx(
      {**direct, 'count': 6}, abs=1e-12)


def test_size_ranges_use_the_annotation_area_not_the_box():
  """A 40 x 40 box (1600 px: medium) whose annotation area is 500 px (its
  segmentation: small) counts as small, as in COCO."""
  images = [image(1, 100, 100, [(10, 10, 40, 40, 1, 500.0, 0)],
                  [(10, 10, 40, 40, 1, 0.9)])]
  stats = evaluator_stats(images)
  assert stats['APs'] == pytest.approx(1.0)
  assert stats['APm'] == -1.0


def test_padded_images_are_ignored(tmp_path):
  """Two real images and six padding rows full of random boxes."""
  images = moved_box_images(0.8) + [image(8, 200, 200,
                                          [(5, 5, 50, 50, 3, None, 0)],
                                          [(5, 5, 50, 50, 3, 0.7)])]
  stats = evaluator_stats(images, pad_to=8)
  assert stats['count'] == 2
  assert stats == pytest.approx({**pycocotools_stats(tmp_path,
                                                     *to_json(images)),
                                 'count': 2})


def test_no_detections_score_zero():
  """Every object missed: AP 0 where there are objects, -1 where none."""
  images = moved_box_images(0.8)
  images[0]['dets'] = []
  stats = evaluator_stats(images)
  assert stats['AP'] == stats['APm'] == stats['AR100'] == 0.0
  assert stats['APs'] == stats['APl'] == -1.0


def test_detections_on_images_without_objects_are_false_positives(tmp_path):
  """A stray detection scored 0.9 on an empty image ranks above the hit
  (0.5) on the other: precision 1/2 at every recall level, AP 1/2."""
  images = [image(1, 100, 100, [(10, 10, 40, 40, 1, None, 0)],
                  [(10, 10, 40, 40, 1, 0.5)]),
            image(2, 100, 100, [], [(30, 30, 40, 40, 1, 0.9)])]
  stats = evaluator_stats(images)
  assert stats['AP'] == pytest.approx(0.5)
  assert stats == pytest.approx({**pycocotools_stats(tmp_path,
                                                     *to_json(images)),
                                 'count': 2})


def test_an_image_added_twice_is_an_error():
  evaluator = coco_eval.CocoEvaluator()
  batch = to_batch(moved_box_images(0.8))
  evaluator.add(batch)
  with pytest.raises(ValueError, match='image_id 7 was added twice'):
    evaluator.add(batch)


def test_labels_outside_the_categories_are_an_error():
  evaluator = coco_eval.CocoEvaluator(category_ids=[1, 2])
  evaluator.add(to_batch(moved_box_images(0.8)))  # category 3
  with pytest.raises(ValueError, match=r'labels \[3\] are not among'):
    evaluator.result()
