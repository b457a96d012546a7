"""The deepforest tree-crown dataset, read from the real wheel: the VOC
parser, the crop rule against pixel counting, the flips and rotations
against painted pixels, determinism, and evaluation coverage."""

import os
import pathlib
import zipfile

import jax
import numpy as np
import pytest

from condconv_jax.data import tree_crowns
from tests import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir():
  """The wheel, from $DEEPFOREST_DATA or <repo>/data/deepforest. Missing
  data fails: these tests are the only check of the embedded job's data."""
  folder = pathlib.Path(os.environ.get('DEEPFOREST_DATA') or
                        REPO / 'data' / 'deepforest')
  if not (folder / tree_crowns.WHEEL).exists():
    pytest.fail(f'{tree_crowns.WHEEL} is not in {folder}. Get it with: '
                f'.venv/bin/pip download --no-deps deepforest==2.1.0 -d '
                f'{REPO / "data" / "deepforest"}')
  return str(folder)


@pytest.fixture(scope='module')
def wheel(data_dir):
  return zipfile.ZipFile(pathlib.Path(data_dir) / tree_crowns.WHEEL)


def dataset(data_dir, **overrides):
  cfg = tiny.config(image_size=96, batch_size=4, augment='aerial',
                    data_dir=data_dir)
  cfg.update(overrides)
  return tree_crowns.TreeCrowns(cfg)


@pytest.mark.parametrize('name,count', [
    (tree_crowns.YELL_IMAGES[0], 574), (tree_crowns.YELL_IMAGES[1], 279),
    ('OSBS_029', 61), ('SOAP_061', 37)])
def test_voc_parser_reads_every_crown(wheel, name, count):
  boxes, names = tree_crowns.read_voc(wheel.read(f'deepforest/data/{name}.xml'))
  assert boxes.shape == (count, 4) and len(names) == count
  if name == 'SOAP_061':
    assert (names.count('Alive'), names.count('Dead')) == (9, 28)
  else:
    assert set(names) == {'Tree'}


def test_voc_boxes_equal_the_wheels_csv(wheel):
  """OSBS_029.csv in the wheel lists the same crowns as its XML, as
  xmin, ymin, xmax, ymax: an independent reading of the coordinates."""
  rows = wheel.read('deepforest/data/OSBS_029.csv').decode().splitlines()[1:]
  csv = np.array([[float(v) for v in row.split(',')[1:5]] for row in rows])
  boxes, _ = tree_crowns.read_voc(wheel.read('deepforest/data/OSBS_029.xml'))
  np.testing.assert_array_equal(boxes, csv[:, [1, 0, 3, 2]])


def test_voc_box_outside_the_stated_size_is_an_error():
  xml = ('<annotation><filename>a.png</filename><size><width>100</width>'
         '<height>50</height></size><object><name>Tree</name><bndbox>'
         '<xmin>10</xmin><ymin>20</ymin><xmax>30</xmax><ymax>60</ymax>'
         '</bndbox></object></annotation>')
  with pytest.raises(ValueError, match='a.png: object 0 .* outside the image '
                     'of 100 x 50 pixels'):
    tree_crowns.read_voc(xml)


def test_missing_wheel_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.delenv('DEEPFOREST_DATA', raising=False)
  with pytest.raises(FileNotFoundError, match='pip download --no-deps '
                     'deepforest==2.1.0 -d <data_dir>'):
    tree_crowns.TreeCrowns(tiny.config(augment='aerial',
                                      data_dir=str(tmp_path)))


def test_an_unzipped_wheel_reads_the_same(data_dir, wheel, tmp_path):
  """`unzip <wheel> 'deepforest/data/*'` leaves deepforest/data/ in the
  folder given."""
  for name in wheel.namelist():
    if name.startswith('deepforest/data/') and name.endswith(('.png', '.xml')):
      wheel.extract(name, tmp_path)
  unzipped, packed = tree_crowns.load(str(tmp_path)), tree_crowns.load(data_dir)
  assert unzipped.keys() == packed.keys()
  for name, arrays in packed.items():
    for a, b in zip(arrays, unzipped[name]):
      np.testing.assert_array_equal(a, b)


def test_images_match_their_annotations(data_dir):
  images = tree_crowns.load(data_dir)
  sizes = {tree_crowns.YELL_IMAGES[0]: (2472, 2299),
           tree_crowns.YELL_IMAGES[1]: (1035, 1249),
           'OSBS_029': (400, 400), 'SOAP_061': (400, 400)}
  for name, (image, boxes, labels) in images.items():
    assert image.shape == (*sizes[name], 3) and image.dtype == np.uint8
    assert (labels == 1).all()  # Tree, Alive and Dead are all trees


def count_inside(box, top, left, tile):
  """Pixels of an integer box inside a tile, by counting them."""
  ymin, xmin, ymax, xmax = box.astype(int)
  ys, xs = np.arange(ymin, ymax), np.arange(xmin, xmax)
  return (((ys >= top) & (ys < top + tile)).sum() *
          ((xs >= left) & (xs < left + tile)).sum())


def test_crops_keep_boxes_half_inside_clipped(data_dir):
  image, boxes, _ = tree_crowns.load(data_dir)[tree_crowns.YELL_IMAGES[0]]
  assert (boxes == np.round(boxes)).all()  # pixel counting applies
  rng = np.random.default_rng(0)
  corners = [(0, 0), (2472 - 400, 2299 - 400)] + [
      tuple(rng.integers(0, (2472 - 399, 2299 - 399))) for _ in range(6)]
  for top, left in corners:
    framed, area, kept = tree_crowns.crop_ground_truth(boxes, top, left)
    want = []
    for i, box in enumerate(boxes):
      inside = count_inside(box, top, left, 400)
      total = (box[2] - box[0]) * (box[3] - box[1])
      if inside > 0 and 2 * inside >= total:
        want.append(i)
    np.testing.assert_array_equal(kept, want)
    for box, crop_box, crop_area in zip(boxes[kept], framed, area):
      y0, x0 = max(box[0], top), max(box[1], left)
      y1, x1 = min(box[2], top + 400), min(box[3], left + 400)
      np.testing.assert_allclose(crop_box * 400,
                                 [y0 - top, x0 - left, y1 - top, x1 - left])
      assert crop_area == count_inside(box, top, left, 400)
  assert sum(len(tree_crowns.crop_ground_truth(boxes, t, l)[2])
             for t, l in corners) > 50


def test_the_half_area_rule_at_its_boundary():
  boxes = np.array([[390, 10, 410, 30],    # 10 of 20 rows inside: kept
                    [391, 50, 411, 70],    # 9 of 20: dropped
                    [400, 90, 420, 110],   # touches the edge: dropped
                    [-5, 392, 15, 402]])   # 15 x 8 of 20 x 10: kept
  framed, area, kept = tree_crowns.crop_ground_truth(boxes, 0, 0)
  np.testing.assert_array_equal(kept, [0, 3])
  np.testing.assert_allclose(framed * 400, [[390, 10, 400, 30],
                                            [0, 392, 15, 400]])
  np.testing.assert_array_equal(area, [200, 120])


def test_flips_and_rotations_move_boxes_with_the_pixels():
  """A painted rectangle's pixel extent after each of the 8 transforms
  equals the transformed box."""
  s = 20
  image = np.zeros((s, s, 1), np.uint8)
  image[3:7, 11:18] = 255  # rows 3..6, columns 11..17
  box = np.array([[3, 11, 7, 18]]) / s
  seen = set()
  for code in range(8):
    flags = [bool(code & 1), bool(code & 2), bool(code & 4)]
    out, out_box = tree_crowns.dihedral(image, box, *flags)
    ys, xs = np.nonzero(out[..., 0])
    extent = [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
    np.testing.assert_allclose(out_box[0] * s, extent)
    seen.add(out.tobytes())
  assert len(seen) == 8  # the 8 symmetries of the square, all distinct


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batch_k_depends_only_on_seed_and_k(data_dir, monkeypatch):
  ds = dataset(data_dir)
  straight = take(ds.train_batches(0), 4)
  resumed = take(ds.train_batches(2), 2)
  for a, b in zip(straight[2:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert straight[0]['image'].shape == (4, 96, 96, 3)
  assert straight[0]['boxes'].shape == (4, tree_crowns.MAX_BOXES, 4)
  assert straight[0]['box_mask'].sum() > 0
  assert not np.array_equal(straight[0]['image'], straight[1]['image'])
  other_seed = take(dataset(data_dir, seed=1).train_batches(0), 1)[0]
  assert not np.array_equal(other_seed['image'], straight[0]['image'])
  # Two processes build halves of the same global batch.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  halves = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    halves.append(take(dataset(data_dir).train_batches(3), 1)[0])
  for key in straight[3]:
    np.testing.assert_array_equal(
        np.concatenate([h[key] for h in halves]), straight[3][key])


def test_unaugmented_epochs_visit_every_grid_tile_once(data_dir):
  """augment='none': the 44 grid tiles of the training regions (36 of the
  big YELL image above its bottom 400 rows, 8 of the small one) in a new
  order each epoch, whatever the batch size (5 does not divide 44)."""
  ds = dataset(data_dir, augment='none', batch_size=5, image_size=400)
  tiles = {t[0].tobytes(): i for i, t in enumerate(ds.examples('train'))}
  assert len(tiles) == ds.num_train == 44
  batches = take(ds.train_batches(0), 18)  # 90 crops: 2 epochs and 2
  seen = [tiles[im.tobytes()] for b in batches for im in b['image']]
  assert sorted(seen[:44]) == sorted(seen[44:88]) == list(range(44))
  assert seen[:44] != seen[44:88]


@pytest.mark.parametrize('processes', [1, 2])
@pytest.mark.parametrize('crop_size,tiles_per_image', [(0, 1), (192, 9)])
@pytest.mark.parametrize('split,count', [('validation', 10), ('test', 2)])
def test_evaluation_covers_every_tile_once(data_dir, monkeypatch, processes,
                                           crop_size, tiles_per_image, split,
                                           count):
  """Every tile of every image once; each row carries its image's whole
  ground truth and the tile's pixels (crop_size 192: 3 x 3 tiles at 0,
  104, 208)."""
  monkeypatch.setattr(jax, 'process_count', lambda: processes)
  per_process = []
  for index in range(processes):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    ds = dataset(data_dir, batch_size=4 * processes, crop_size=crop_size,
                 image_size=crop_size or 400)
    per_process.append(list(ds.eval_batches(split)))
  assert len({len(batches) for batches in per_process}) == 1  # in step
  rows = [(i, tuple(w)) for batches in per_process for b in batches
          for i, w in zip(b['image_id'][b['mask']], b['window'][b['mask']])]
  assert len(rows) == len(set(rows)) == count * tiles_per_image
  assert sorted({i for i, _ in rows}) == list(range(count))
  examples = ds.examples(split)
  for b in (b for batches in per_process for b in batches):
    for row in np.flatnonzero(b['mask']):
      image, boxes, labels, area = examples[b['image_id'][row]]
      top, left, bottom, right = np.round(b['window'][row] * 400).astype(int)
      np.testing.assert_array_equal(b['image'][row],
                                    image[top:bottom, left:right])
      k = len(boxes)
      assert b['box_mask'][row].sum() == k
      np.testing.assert_array_equal(b['boxes'][row, :k], boxes)
      np.testing.assert_array_equal(b['labels'][row, :k], labels)
      np.testing.assert_array_equal(b['gt_area'][row, :k], area)
      assert tuple(b['image_size'][row]) == (400, 400)
      assert not b['gt_crowd'][row].any()
    assert not b['box_mask'][~b['mask']].any()


def test_test_split_is_the_two_whole_annotated_images(data_dir, wheel):
  ds = dataset(data_dir)
  for (image, boxes, labels, area), name in zip(ds.examples('test'),
                                                tree_crowns.TEST_IMAGES):
    pixels, _ = tree_crowns.read_voc(wheel.read(f'deepforest/data/{name}.xml'))
    np.testing.assert_allclose(boxes * 400, pixels, atol=1e-4)
    np.testing.assert_allclose(
        area, (pixels[:, 2] - pixels[:, 0]) * (pixels[:, 3] - pixels[:, 1]))
    assert image.shape == (400, 400, 3) and (labels == 1).all()


def test_training_crops_are_crop_size_within_the_scale_jitter(data_dir):
  """crop_size 192, scale_jitter 0.5: each crop is 128-288 source pixels
  (read back from a crown's size: boxes scale by image_size / crop)."""
  ds = dataset(data_dir, crop_size=192, image_size=192, scale_jitter=0.5,
               batch_size=16)
  sizes = []
  original = ds._crop
  ds._crop = lambda *args: (sizes.append(args[3]), original(*args))[1]
  take(ds.train_batches(0), 4)
  assert len(sizes) == 64
  assert min(sizes) >= 128 and max(sizes) <= 288
  assert max(sizes) - min(sizes) > 80  # drawn, not fixed
  fixed = dataset(data_dir, crop_size=192, image_size=192, batch_size=16)
  sizes.clear()
  fixed._crop = lambda *args: (sizes.append(args[3]), original(*args))[1]
  take(fixed.train_batches(0), 1)
  assert set(sizes) == {192}


def test_photometric_jitter_changes_colours_within_tf_bounds(data_dir):
  plain = take(dataset(data_dir).train_batches(0), 2)
  colour = take(dataset(data_dir, augment='aerial_color').train_batches(0), 2)
  for a, b in zip(plain, colour):
    np.testing.assert_array_equal(a['boxes'], b['boxes'])  # same crops
    assert not np.array_equal(a['image'], b['image'])
    mean_a = a['image'].reshape(4, -1).mean(1)
    mean_b = b['image'].reshape(4, -1).mean(1)
    # brightness +-0.2 of the range; contrast and saturation keep the mean
    # up to clipping
    assert np.all(np.abs(mean_b - mean_a) <= 0.2 * 255 + 2)


def test_bad_crop_size_or_jitter_is_an_error(data_dir):
  with pytest.raises(ValueError, match='crop_size'):
    dataset(data_dir, crop_size=500)
  with pytest.raises(ValueError, match='crop_size'):
    dataset(data_dir, crop_size=64)
  with pytest.raises(ValueError, match='scale_jitter'):
    dataset(data_dir, scale_jitter=-0.1)


@pytest.mark.parametrize('crop_size', [0, 192])
def test_perfect_tile_detections_stitch_to_perfect_scores(data_dir,
                                                          crop_size):
  """Each tile 'detects' the crowns centred in it (clipped to the tile, as
  a detector sees them): stitched, COCO AP50 and deepforest's box
  precision and recall are 1 on the test images (no crown there is larger
  than the tiles' overlap)."""
  from condconv_jax.training.tasks import DetectionEvaluator  # pylint: disable=g-import-not-at-top
  ds = dataset(data_dir, crop_size=crop_size, image_size=crop_size or 400)
  evaluator = DetectionEvaluator(score_threshold=0.5)
  for b in ds.eval_batches('test'):
    size = len(b['mask'])
    boxes = np.zeros((size, 100, 4))
    count = np.zeros(size, int)
    for i in range(size):
      w = b['window'][i]
      gt = b['boxes'][i][b['box_mask'][i]]
      centre = (gt[:, :2] + gt[:, 2:]) / 2
      inside = np.all((centre >= w[:2]) & (centre < w[2:]), 1)
      local = np.clip((gt[inside] - np.tile(w[:2], 2)) /
                      np.tile(w[2:] - w[:2], 2), 0, 1)
      boxes[i, :len(local)] = local
      count[i] = len(local)
    evaluator.add({
        'boxes': boxes, 'scores': (np.arange(100) < count[:, None]) * 0.9,
        'classes': (np.arange(100) < count[:, None]).astype(int),
        'count': count, 'gt_boxes': b['boxes'], 'gt_labels': b['labels'],
        'gt_mask': b['box_mask'], **{k: b[k] for k in (
            'gt_area', 'gt_crowd', 'mask', 'image_id', 'image_size',
            'window', 'core')}})
  metrics = evaluator.result()
  assert metrics['count'] == 2
  assert metrics['AP50'] == pytest.approx(1.0)
  assert metrics['box_precision'] == metrics['box_recall'] == 1.0


def test_anchor_reach_counts_every_crown_once_per_image(data_dir):
  """benchmarks/tree_crown_anchors.py: every crown of every image lands in
  exactly one tile (its core), and its best anchor IoU is the brute-force
  maximum over the anchors."""
  from benchmarks import tree_crown_anchors  # pylint: disable=g-import-not-at-top
  from condconv_jax.models import get_model  # pylint: disable=g-import-not-at-top
  config = tree_crown_anchors.load_config(REPO / 'configs' / 'tree_crowns.py')
  config.data_dir = data_dir
  ds = tree_crowns.TreeCrowns(config)
  boxes, sides = tree_crown_anchors.tile_crowns(ds, 'test')
  assert len(boxes) == len(sides) == sum(
      len(b) for _, b, _, _ in ds.examples('test'))
  assert sides.min() > 5 and sides.max() < 110
  model = get_model(config.model, num_classes=2, width=config.width,
                    **config.model_kwargs.to_dict())
  anchors = model.anchors(config.image_size)
  measured = tree_crown_anchors.best_anchor_iou(boxes[:8], anchors)
  for box, found in zip(boxes[:8], measured):
    best = 0.0
    for anchor in anchors:
      h = max(0.0, min(box[2], anchor[2]) - max(box[0], anchor[0]))
      w = max(0.0, min(box[3], anchor[3]) - max(box[1], anchor[1]))
      union = ((box[2] - box[0]) * (box[3] - box[1]) +
               (anchor[2] - anchor[0]) * (anchor[3] - anchor[1]) - h * w)
      best = max(best, h * w / union)
    assert found == pytest.approx(best, rel=1e-5)
