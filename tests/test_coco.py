"""The COCO input pipeline on TFDS mock data and on hand-made coco/2017
examples: batch layout, resumption, evaluation coverage across processes,
the SSD crop rule against NumPy, and the label table against torchvision's
COCO category list."""

import ast
import collections
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from condconv_jax.data import coco, common
from tests import tiny

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')


def config(**overrides):
  cfg = tiny.config(dataset='coco', image_size=32, batch_size=2,
                    augment='ssd')
  cfg.update(overrides)
  return cfg


# Label table.

def torchvision_coco_categories():
  """torchvision's `_COCO_CATEGORIES` (models/_meta.py), COCO's 91 category
  slots by id ('N/A' for ids never used, '__background__' at 0), read from
  the source: importing torch after tensorflow crashes this process."""
  spec = importlib.util.find_spec('torchvision')
  if spec is None:
    pytest.skip('torchvision (requirements-test.txt) is not installed')
  source = pathlib.Path(spec.origin).parent / 'models' / '_meta.py'
  for node in ast.parse(source.read_text()).body:
    if (isinstance(node, ast.Assign) and
        getattr(node.targets[0], 'id', '') == '_COCO_CATEGORIES'):
      return ast.literal_eval(node.value)
  raise AssertionError(f'no _COCO_CATEGORIES in {source}')


def test_category_table_matches_torchvision_coco_names():
  """The TFDS label order, categories by increasing id, pairs each name
  with its id as torchvision's independent list does."""
  by_id = torchvision_coco_categories()
  ids = coco.COCO_CATEGORY_IDS
  assert len(by_id) == coco.NUM_CLASSES == 91
  assert len(ids) == len(coco.COCO_NAMES) == 80
  assert list(ids) == sorted(set(ids))
  assert [i for i, n in enumerate(by_id)
          if n not in ('N/A', '__background__')] == list(ids)
  assert [by_id[i] for i in ids] == list(coco.COCO_NAMES)


def test_label_names_of_a_prepared_dataset_are_checked():
  coco._check_label_names(coco.COCO_NAMES)  # pylint: disable=protected-access
  coco._check_label_names([str(i) for i in range(80)])  # pylint: disable=protected-access
  swapped = list(coco.COCO_NAMES)
  swapped[0], swapped[1] = swapped[1], swapped[0]
  with pytest.raises(ValueError, match='differ from coco.COCO_NAMES'):
    coco._check_label_names(swapped)  # pylint: disable=protected-access


# The crop rule.

def brute_force_crop(boxes, window, threshold):
  """The TF Object Detection API rule, box by box."""
  wy0, wx0, wy1, wx1 = window
  kept, framed = [], []
  for i, (y0, x0, y1, x1) in enumerate(np.asarray(boxes, np.float64)):
    if y0 >= wy1 or x0 >= wx1 or y1 <= wy0 or x1 <= wx0:
      continue  # prune_completely_outside_window
    area = (y1 - y0) * (x1 - x0)
    inter = ((min(y1, wy1) - max(y0, wy0)) * (min(x1, wx1) - max(x0, wx0)))
    if area == 0 or inter / area < threshold:
      continue  # prune_non_overlapping_boxes (0 / 0 is NaN: dropped)
    h, w = wy1 - wy0, wx1 - wx0
    framed.append(np.clip([(y0 - wy0) / h, (x0 - wx0) / w, (y1 - wy0) / h,
                           (x1 - wx0) / w], 0, 1))
    kept.append(i)
  return np.array(kept, int), np.array(framed).reshape(-1, 4)


BOXES = np.array([
    [0.25, 0.0, 0.75, 0.5],    # IoA exactly .5 with WINDOW
    [0.1, 0.1, 0.2, 0.3],      # inside
    [0.5, 0.7, 0.5, 0.9],      # zero height
    [0.0, 0.5, 0.6, 0.9],      # touches the window's right edge only
    [0.45, 0.2, 0.55, 0.45],   # crosses the bottom edge, IoA .5
    [0.3, 0.05, 0.9, 0.4],     # IoA 1/3
    [0.6, 0.6, 0.9, 0.9]],     # outside
    np.float32)
WINDOW = np.array([0.0, 0.0, 0.5, 0.5], np.float32)


@pytest.mark.parametrize('threshold', [0.0, 0.3, 0.5, 0.7, 1.0])
def test_crop_rule_equals_brute_force_in_numpy_and_tf(threshold):
  import tensorflow.experimental.numpy as tnp  # pylint: disable=g-import-not-at-top
  want_kept, want_boxes = brute_force_crop(BOXES, WINDOW, threshold)
  for xp, boxes, window in ((np, BOXES, WINDOW),
                            (tnp, tf.constant(BOXES), tf.constant(WINDOW))):
    framed, keep = common.crop_boxes(boxes, window, threshold, xp=xp)
    keep = np.asarray(keep)
    np.testing.assert_array_equal(np.flatnonzero(keep), want_kept)
    np.testing.assert_allclose(np.asarray(framed)[keep], want_boxes,
                               atol=1e-6)
  expected = {0.0: [0, 1, 4, 5], 0.3: [0, 1, 4, 5], 0.5: [0, 1, 4],
              0.7: [1], 1.0: [1]}[threshold]
  np.testing.assert_array_equal(want_kept, expected)


def test_ssd_random_crop_follows_the_tf_options():
  """400 draws on a 200 x 300 image: the keep-whole rate (random_coef .15)
  and the 7 options are at their rates, each window meets its option's
  min_object_covered and the ranges of aspect ratio and area, and the boxes
  kept are the brute-force rule's with the option's overlap threshold."""
  pipeline = object.__new__(coco.Coco)
  pipeline.tf = tf
  shape = tf.constant([200, 300, 3], tf.int32)
  boxes = tf.constant([[0.1, 0.1, 0.3, 0.25], [0.4, 0.5, 0.9, 0.95],
                       [0.05, 0.6, 0.35, 0.8]], tf.float32)

  def draw(i):
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.constant(7, tf.int64), i]), 4)
    option, crop = pipeline.ssd_crop_choice(seeds[:2])
    window, framed, keep = pipeline.ssd_random_crop(seeds[:3], shape, boxes)
    return option, crop, window, framed, keep

  draws = list(tfds.as_numpy(tf.data.Dataset.range(400).map(draw)))
  crops = [d for d in draws if d[1]]
  assert 35 <= len(draws) - len(crops) <= 85  # 400 x .15 = 60 +- 3 sd
  counts = collections.Counter(int(d[0]) for d in draws)
  assert len(counts) == 7 and min(counts.values()) >= 30  # 57 each
  np_boxes = boxes.numpy().astype(np.float64)
  for option, crop, (top, left, h, w), framed, keep in draws:
    if not crop:
      assert (top, left, h, w) == (0, 0, 200, 300) and keep.all()
      np.testing.assert_array_equal(framed, np_boxes.astype(np.float32))
      continue
    assert 0.5 - 0.02 <= w / h <= 2 + 0.02
    assert 0.1 - 0.01 <= h * w / 60000 <= 1
    # The sampler's normalized window, in its float32.
    window = (np.array([top, left, top + h, left + w], np.float32) /
              np.array([200, 300, 200, 300], np.float32)).astype(np.float64)
    covered = np.array([
        (max(0, min(b[2], window[2]) - max(b[0], window[0])) *
         max(0, min(b[3], window[3]) - max(b[1], window[1])) /
         ((b[2] - b[0]) * (b[3] - b[1]))) for b in np_boxes])
    assert covered.max() >= coco.SSD_MIN_OBJECT_COVERED[option] - 1e-5
    threshold = coco.SSD_OVERLAP_THRESH[option]
    want_kept, want_boxes = brute_force_crop(np_boxes, window, threshold)
    # float32 rounding decides boxes whose IoA is the threshold itself.
    clear = np.abs(covered - threshold) > 1e-5
    np.testing.assert_array_equal(keep[clear],
                                  np.isin(np.arange(3), want_kept)[clear])
    both = np.intersect1d(np.flatnonzero(keep), want_kept)
    np.testing.assert_allclose(
        framed[both], want_boxes[np.searchsorted(want_kept, both)], atol=1e-5)
  assert any(not keep.all() for *_, keep in crops)  # some boxes pruned


# TFDS mock data (random examples).

@pytest.fixture
def mock_coco(monkeypatch):
  """tfds.testing.mock_data for coco/2017, fixed up: the mock draws each
  per-object field with its own random length and random corner order, and
  TFDS's own encoder (which the SkipDecoding read path uses, like every
  prepared dataset) refuses both (Sequence: 'The length of all elements of
  one sequence should be the same'; BBoxFeature: 'min <= max'). So each
  example's objects are cut to the shortest field and each box's corners
  sorted before encoding."""
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  generate = mocking.RandomFakeGenerator._generate_example  # pylint: disable=protected-access

  def fixed(self, rng):
    example = generate(self, rng)
    objects = example['objects']
    n = min(len(v) for v in objects.values())
    objects = {k: v[:n] for k, v in objects.items()}
    bbox = objects['bbox']
    objects['bbox'] = np.concatenate([np.minimum(bbox[:, :2], bbox[:, 2:]),
                                      np.maximum(bbox[:, :2], bbox[:, 2:])],
                                     axis=1)
    return {**example, 'objects': objects}

  monkeypatch.setattr(mocking.RandomFakeGenerator, '_generate_example', fixed)
  with tfds.testing.mock_data(num_examples=8,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def check_ground_truth(batch, g=coco.MAX_BOXES):
  boxes, labels, mask = batch['boxes'], batch['labels'], batch['box_mask']
  assert boxes.shape[1:] == (g, 4) and boxes.dtype == np.float32
  assert labels.dtype == np.int32 and mask.dtype == bool
  real = boxes[mask]
  assert ((real >= 0) & (real <= 1)).all()
  assert (real[:, 0] <= real[:, 2]).all() and (real[:, 1] <= real[:, 3]).all()
  assert np.isin(labels[mask], coco.COCO_CATEGORY_IDS).all()
  assert (labels[~mask] == 0).all() and (boxes[~mask] == 0).all()
  # Real boxes come first.
  assert (np.sort(mask, axis=1)[:, ::-1] == mask).all()


@pytest.mark.parametrize('augment', ['ssd', 'none'])
def test_train_batches_are_uint8_padded_and_resume_mid_epoch(mock_coco,
                                                             augment):
  ds = coco.Coco(config(augment=augment))
  assert (ds.num_train, ds.steps_per_epoch) == (8, 4)
  assert ds.num_classes == 91 and ds.image_shape == (32, 32, 3)
  straight = [b for _, b in zip(range(10), ds.train_batches(0))]
  first = straight[0]
  assert first['image'].shape == (2, 32, 32, 3)
  assert first['image'].dtype == np.uint8
  for batch in straight:
    check_ground_truth(batch)
  assert sum(b['box_mask'].sum() for b in straight) > 0
  resumed = [b for _, b in zip(range(4), ds.train_batches(6))]  # mid-epoch 1
  for a, b in zip(straight[6:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Epochs 0 and 1 differ (order, and crops with 'ssd').
  assert not np.array_equal(
      np.concatenate([b['image'] for b in straight[:4]]),
      np.concatenate([b['image'] for b in straight[4:8]]))


def test_options_are_checked(mock_coco):
  with pytest.raises(ValueError, match="config.augment must be one of 'ssd'"):
    coco.Coco(config(augment='inception'))
  ds = coco.Coco(config())
  with pytest.raises(ValueError, match='config.eval_split must be one of'):
    next(ds.eval_batches('test'))


def test_unprepared_coco_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'tfds build coco/2017 '
                     r'--data_dir=<data_dir>.*--config.data_dir'):
    coco.Coco(config(data_dir=str(tmp_path)))


# Hand-made coco/2017 examples, served through TFDS's own encode/decode and
# split into per-process shards as tfds.even_splits does (the random mock
# ignores the split it is asked for).

def hand_made_examples(n, crowded=None):
  """Example i: an image of one grey level 20 i + 10 and size (40 + 7 i) x
  (60 - 3 i); i % 4 objects (label i + k, one crowd, areas 100 i + k),
  plus a box of zero height in example 3; `crowded` gets 101 objects."""
  examples = []
  for i in range(n):
    k = 101 if i == crowded else i % 4
    boxes = np.array([[0.1 * (j % 5), 0.05, 0.1 * (j % 5) + 0.3, 0.5]
                      for j in range(k)], np.float32).reshape(-1, 4)
    if i == 3:
      boxes[2] = [0.4, 0.2, 0.4, 0.6]
    examples.append({
        'image': np.full((40 + 7 * i, 60 - 3 * i, 3), 20 * i + 10, np.uint8),
        'image/filename': f'{i}.jpg', 'image/id': 5000 + i,
        'objects': {'id': np.arange(k, dtype=np.int64) + 100 * i,
                    'area': np.arange(k, dtype=np.int64) + 100 * i,
                    'bbox': boxes,
                    'label': (np.arange(k) + i) % 80,
                    'is_crowd': np.arange(k) == 1}})
  return examples


@pytest.fixture
def hand_made_coco():
  def serve(n, crowded=None):
    examples = hand_made_examples(n, crowded)

    def as_dataset(builder, split, decoders=None, read_config=None,
                   shuffle_files=False):
      del read_config, shuffle_files
      features = builder.info.features
      rows = np.arange(len(examples))
      if not isinstance(split, str):  # tfds.even_splits: first shards longer
        rows = np.array_split(rows, split.count)[split.index]
      encoded = [features.encode_example(examples[i]) for i in rows]
      specs = features.get_serialized_info()
      ds = tf.data.Dataset.from_generator(
          lambda: iter(encoded),
          output_signature=tf.nest.map_structure(
              lambda t: tf.TensorSpec(t.shape, t.tf_dtype), specs))
      return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))

    return tfds.testing.mock_data(as_dataset_fn=as_dataset,
                                  policy=tfds.testing.MockPolicy.USE_CODE)
  return serve


def eval_rows(batches):
  """Real images of evaluation batches: {image_id: {key: row}}."""
  rows = {}
  for b in batches:
    for r in np.flatnonzero(b['mask']):
      assert b['image_id'][r] not in rows
      rows[int(b['image_id'][r])] = {k: v[r] for k, v in b.items()}
  return rows


@pytest.mark.parametrize('processes,images,batches', [
    (1, 7, [4]),     # 7 images in batches of 2
    (2, 7, [2, 2]),  # shards of 4 and 3 images, batches of 2 per process
    (2, 5, [2, 2])])  # shards of 3 and 2: the second pads a whole batch
def test_evaluation_covers_every_image_once_with_its_annotations(
    hand_made_coco, monkeypatch, processes, images, batches):
  examples = hand_made_examples(images)
  monkeypatch.setattr(jax, 'process_count', lambda: processes)
  per_process = []
  with hand_made_coco(images):
    for index in range(processes):
      monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
      ds = coco.Coco(config(batch_size=2 * processes))
      assert ds.num_eval == images
      per_process.append(list(ds.eval_batches()))
  assert [len(b) for b in per_process] == batches  # processes stay in step
  for batches in per_process:
    for b in batches:
      check_ground_truth(b)
      assert not b['box_mask'][~b['mask']].any()
  rows = eval_rows(b for batches in per_process for b in batches)
  assert sorted(rows) == [5000 + i for i in range(images)]
  for i, example in enumerate(examples):
    row, objects = rows[5000 + i], example['objects']
    k = len(objects['label'])
    np.testing.assert_array_equal(row['image_size'],
                                  example['image'].shape[:2])
    assert abs(row['image'].astype(int) - (20 * i + 10)).max() <= 3  # JPEG
    assert row['box_mask'].sum() == k
    np.testing.assert_allclose(row['boxes'][:k], objects['bbox'])
    np.testing.assert_array_equal(
        row['labels'][:k], np.array(coco.COCO_CATEGORY_IDS)[objects['label']])
    np.testing.assert_array_equal(row['gt_area'][:k], objects['area'])
    np.testing.assert_array_equal(row['gt_crowd'][:k], objects['is_crowd'])
    assert row['image_id'].dtype == np.int64


def test_training_without_augmentation_keeps_boxes_and_drops_empty_ones(
    hand_made_coco):
  """augment='none' gives each image's boxes unchanged, less the box of
  zero height (TF's create_coco_tf_record skips those)."""
  with hand_made_coco(4):
    ds = coco.Coco(config(augment='none', batch_size=4))
    batch = next(ds.train_batches(0))
  examples = hand_made_examples(4)
  seen = set()
  for r in range(4):
    i = round((batch['image'][r].mean() - 10) / 20)
    seen.add(i)
    boxes = examples[i]['objects']['bbox']
    if i == 3:
      boxes = boxes[[0, 1]]
    k = len(boxes)
    assert batch['box_mask'][r].sum() == k
    np.testing.assert_allclose(batch['boxes'][r, :k], boxes)
  assert seen == {0, 1, 2, 3}


def test_more_annotations_than_max_boxes(hand_made_coco):
  """Training clips to MAX_BOXES as TF does; evaluation refuses to drop
  annotations."""
  with hand_made_coco(2, crowded=1):
    ds = coco.Coco(config(augment='none', batch_size=2))
    batch = next(ds.train_batches(0))
    assert sorted(batch['box_mask'].sum(1)) == [0, coco.MAX_BOXES]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r'coco.MAX_BOXES \(100\) is smaller'):
      list(ds.eval_batches())
