"""Tree-crown detection in aerial images: the embedded detection job.

The data are the annotated NEON RGB images (10 cm pixels) that the
MIT-licensed `deepforest` 2.1.0 wheel ships in `deepforest/data/`, read
straight out of the wheel (a zip) with their Pascal-VOC XML boxes; the
package itself (and its torch stack) is never installed.

Splits (every crown is class 1, 'Tree'; SOAP_061's 'Alive' and 'Dead' too):
  train and validation: the two YELL images (2019, one site):
    2019_YELL_2_528000_4978000_image_crop2.png (2472 x 2299, 574 crowns) and
    2019_YELL_2_541000_4977000_image_crop.png (1035 x 1249, 279 crowns).
    The bottom 400 rows of each are validation (their 400 x 400 grid
    tiles), the rest is training. 'aerial' augmentation draws crops of
    config.crop_size source pixels (400 when 0; each drawn log-uniformly
    within a factor 1 + config.scale_jitter of it) at random positions of
    the training regions (a region in proportion to its positions) with
    random horizontal and vertical flips and 90-degree rotations (aerial
    images have no up: the 8 symmetries of the square are equally likely,
    as the TF Object Detection API's random_horizontal_flip +
    random_vertical_flip + random_rotation90 make them); 'aerial_color'
    adds brightness, contrast and saturation jitter; 'none' takes the
    training regions' grid tiles of crop_size, in a fresh order every
    epoch. A crown cut by the border between the regions is in both, each
    keeping its part by the half-area rule below.
  test: OSBS_029.png (61 crowns) and SOAP_061.png (37), whole 400 x 400
    images from two other sites.

Every crop and tile is resized (bilinear) to config.image_size; with
crop_size = image_size crowns keep their native 15-75 pixels. Evaluation
images (the 400 x 400 validation tiles and test images) are detected on
overlapping crop_size tiles (`condconv_jax.detection.tiles`, one tile when
crop_size is 400) that the evaluator stitches back together; each
evaluation row is one tile, with the whole image's ground truth. Grid
tiles of an image cover it with the fewest tiles, evenly spaced;
neighbouring validation images overlap, so a crown near their border is
scored in each that keeps it.
A crop keeps a box when at least half of the box's area lies inside it,
clipped to the crop (`common.crop_boxes` with min_overlap 0.5).
VOC coordinates are used as given, as continuous pixel coordinates (as
deepforest reads them: its OSBS_029.csv holds the same numbers).

Batches have the detection layout (`condconv_jax.data.common`) with G =
MAX_BOXES: train 'image' uint8 [b, S, S, 3], 'boxes' float32 [b, G, 4]
normalized [ymin, xmin, ymax, xmax], 'labels' int32 [b, G] (1, 0 on
padding), 'box_mask' bool [b, G]; evaluation adds 'mask' bool [b],
'image_id' int64 [b] (the index into examples(split)), 'image_size' int32
[b, 2] (400, 400: the source image), 'window' and 'core' float32 [b, 4]
(the tile and the part of the image it keeps detections in, normalized),
'gt_area' float32 [b, G] (box area in source pixels), 'gt_crowd' bool
[b, G] (all False).
"""

from __future__ import annotations

import functools
import io
import math
import os
import xml.etree.ElementTree as ElementTree
import zipfile

import jax
import numpy as np
from etils import epath
from PIL import Image

from condconv_jax.choices import check_choice
from condconv_jax.data import common
from condconv_jax.detection import tiles
from condconv_jax.detection.boxes import validate_ground_truth

WHEEL = 'deepforest-2.1.0-py3-none-any.whl'
WHEEL_DATA = 'deepforest/data'
YELL_IMAGES = ('2019_YELL_2_528000_4978000_image_crop2',
               '2019_YELL_2_541000_4977000_image_crop')
TEST_IMAGES = ('OSBS_029', 'SOAP_061')
TREE_NAMES = ('Tree', 'Alive', 'Dead')  # all class 1
NUM_CLASSES = 2  # background + tree
TILE = 400  # source pixels: the test images' size
MIN_OVERLAP = 0.5  # a cut box stays when half of it is inside the crop
# The most crowns a 400 x 400 window keeps (windows at every 4th pixel
# position searched): 49 in the train image, 58 in the validation image;
# OSBS_029 has 61. About twice that, so no crown is ever dropped (a crop
# exceeding it raises).
MAX_BOXES = 128
# Evaluation tiles overlap by at least the largest crowns (95% are under
# 75 pixels, the largest 108), so the tile owning a crown's centre sees it
# whole (condconv_jax.detection.tiles).
MIN_TILE_OVERLAP = 80
# 'aerial_color' adds TF Object Detection API-style photometric jitter
# (random_adjust_brightness/contrast/saturation) to 'aerial'.
AUGMENTATIONS = ('aerial', 'aerial_color', 'none')
BRIGHTNESS_DELTA = 0.2  # of the 0-255 range, as TF's max_delta 0.2 of 0-1
CONTRAST_RANGE = (0.8, 1.25)
SATURATION_RANGE = (0.8, 1.25)
SPLITS = ('train', 'validation', 'test')
EVAL_SPLITS = ('validation', 'test', 'train')
DOWNLOAD = 'pip download --no-deps deepforest==2.1.0 -d {data_dir}'


def read_voc(xml_text: str | bytes):
  """A Pascal-VOC annotation -> (boxes float64 [N, 4] pixel [ymin, xmin,
  ymax, xmax], names [N]); raises ValueError on a box that is empty or
  outside the image size the file states."""
  root = ElementTree.fromstring(xml_text)
  filename = root.findtext('filename', '?')
  size = root.find('size')
  if size is None:
    raise ValueError(f'{filename}: VOC annotation without <size>.')
  height, width = float(size.findtext('height')), float(size.findtext('width'))
  boxes, names = [], []
  for i, obj in enumerate(root.iter('object')):
    box = obj.find('bndbox')
    ymin, xmin, ymax, xmax = (float(box.findtext(k))
                              for k in ('ymin', 'xmin', 'ymax', 'xmax'))
    if not (0 <= ymin < ymax <= height and 0 <= xmin < xmax <= width):
      raise ValueError(
          f'{filename}: object {i} has box (xmin, ymin, xmax, ymax) = '
          f'{(xmin, ymin, xmax, ymax)}, empty or outside the image of '
          f'{width:g} x {height:g} pixels its <size> states.')
    boxes.append((ymin, xmin, ymax, xmax))
    names.append(obj.findtext('name'))
  return np.array(boxes, np.float64).reshape(-1, 4), names


def _reader(data_dir: str):
  """name -> bytes of deepforest/data/<name>, from the wheel in data_dir or
  from an unzipped copy (data_dir holding deepforest/data/ or the files)."""
  directory = data_dir or os.environ.get('DEEPFOREST_DATA', '')
  if directory:
    root = epath.Path(directory)
    if (root / WHEEL).exists():
      with (root / WHEEL).open('rb') as f:
        archive = zipfile.ZipFile(io.BytesIO(f.read()))
      return lambda name: archive.read(f'{WHEEL_DATA}/{name}')
    for folder in (root / WHEEL_DATA, root):
      if (folder / f'{YELL_IMAGES[0]}.png').exists():
        return lambda name, folder=folder: (folder / name).read_bytes()
  raise FileNotFoundError(
      f'The deepforest data ({WHEEL}) is not in {directory or "(no folder)"}'
      '. Get it with `' + DOWNLOAD.format(data_dir='<data_dir>') + '` (20.6 '
      'MB, the wheel only: do not install it) and pass '
      '--config.data_dir=<data_dir> or set DEEPFOREST_DATA=<data_dir>; a '
      'folder holding the unzipped deepforest/data/ works too.')


@functools.lru_cache(maxsize=2)
def load(data_dir: str = ''):
  """{image name: (image uint8 [H, W, 3], boxes float64 [N, 4] pixels,
  labels int32 [N])} for the train, validation and test images."""
  read = _reader(data_dir)
  images = {}
  for name in (*YELL_IMAGES, *TEST_IMAGES):
    image = np.asarray(Image.open(io.BytesIO(read(f'{name}.png')))
                       .convert('RGB'))
    boxes, names = read_voc(read(f'{name}.xml'))
    unknown = sorted(set(names) - set(TREE_NAMES))
    if unknown:
      raise ValueError(f'{name}.xml: unknown class names {unknown}; '
                       f'expected {TREE_NAMES}.')
    height, width = image.shape[:2]
    if (boxes[:, 2] > height).any() or (boxes[:, 3] > width).any():
      raise ValueError(f'{name}.xml has boxes beyond its {width} x {height} '
                       'image: the annotation belongs to another image.')
    # Shared by every crop and examples(): drawing on them must copy.
    image.flags.writeable = False
    images[name] = (image, boxes, np.ones(len(boxes), np.int32))
  return images


def grid(height: int, width: int, tile: int = TILE):
  """Top-left corners [K, 2] of the fewest tile x tile windows covering an
  image, evenly spaced, row-major."""
  def starts(size):
    return np.round(np.linspace(0, size - tile, math.ceil(size / tile))
                    ).astype(int)
  return np.array([(y, x) for y in starts(height) for x in starts(width)])


def crop_ground_truth(boxes, top: int, left: int, tile: int = TILE):
  """Boxes [N, 4] pixels -> those a tile x tile crop at (top, left) keeps:
  (boxes [K, 4] normalized to the crop, area [K] in pixels after clipping,
  indices [K] into boxes)."""
  window = np.array([top, left, top + tile, left + tile], np.float64)
  framed, keep = common.crop_boxes(boxes, window, MIN_OVERLAP)
  # In pixels, not from the normalized boxes: exact for integer boxes.
  clipped = np.clip(boxes[keep], window[:2].tolist() * 2,
                    window[2:].tolist() * 2)
  area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
  return framed[keep], area, np.flatnonzero(keep)


def dihedral(image, boxes, hflip: bool, vflip: bool, rot90: bool):
  """The TF Object Detection API's random_horizontal_flip,
  random_vertical_flip and random_rotation90 (counter-clockwise), in that
  order, on image [S, S, C] and normalized boxes [K, 4]."""
  ymin, xmin, ymax, xmax = boxes.T
  if hflip:
    image = image[:, ::-1]
    xmin, xmax = 1.0 - xmax, 1.0 - xmin
  if vflip:
    image = image[::-1]
    ymin, ymax = 1.0 - ymax, 1.0 - ymin
  if rot90:  # a pixel at (y, x) goes to (S - 1 - x, y)
    image = np.rot90(image)
    ymin, xmin, ymax, xmax = 1.0 - xmax, ymin, 1.0 - xmin, ymax
  return (np.ascontiguousarray(image),
          np.stack([ymin, xmin, ymax, xmax], axis=1).reshape(-1, 4))


class TreeCrowns(common.SquareImages):
  """The deepforest tree-crown images as a detection dataset (see the
  module docstring for splits and batch layout)."""

  task = 'detection'
  num_classes = NUM_CLASSES
  max_boxes = MAX_BOXES
  normalization = common.SSD_NORMALIZATION

  def __init__(self, config):
    augment = check_choice('config.augment', config.augment, AUGMENTATIONS)
    self.augment = augment != 'none'
    self.photometric = augment == 'aerial_color'
    self.crop = config.crop_size or TILE
    if not MIN_TILE_OVERLAP < self.crop <= TILE:
      raise ValueError(f'config.crop_size must be in ({MIN_TILE_OVERLAP}, '
                       f'{TILE}] source pixels (0: {TILE}, a test image); '
                       f'got {config.crop_size}.')
    if config.scale_jitter < 0:
      raise ValueError('config.scale_jitter must be >= 0 (0: every crop '
                       f'is crop_size); got {config.scale_jitter}.')
    self.scale_jitter = config.scale_jitter
    # An evaluation image's tiles: windows and cores normalized in it.
    self.tile_windows, self.tile_cores = tiles.tile_layout(
        TILE, self.crop, MIN_TILE_OVERLAP)
    self.images = load(config.data_dir or '')
    self.image_size = config.image_size
    self.batch_size = config.batch_size
    self.local_batch = common.local_batch_size(self.batch_size)
    self.seed = config.seed
    self._examples = {}
    # Windows (image, top, left) of the training regions' grid tiles; an
    # epoch is as many crops.
    self.train_grid = self._grid('train', self.crop)
    self.num_train = len(self.train_grid)
    self.num_eval = len(self.examples('validation'))

  def _regions(self, split: str):
    """[(image name, first row, end row)] of the YELL images' training
    (all but the bottom TILE rows) or validation (those) regions."""
    regions = []
    for name in YELL_IMAGES:
      height = self.images[name][0].shape[0]
      rows = (0, height - TILE) if split == 'train' else (height - TILE,
                                                            height)
      regions.append((name, *rows))
    return regions

  def _grid(self, split: str, tile: int = TILE):
    """[(image name, top, left)] of the grid tiles of a split's regions."""
    windows = []
    for name, first, end in self._regions(split):
      width = self.images[name][0].shape[1]
      windows += [(name, first + top, left)
                  for top, left in grid(end - first, width, tile)]
    return windows

  def _resize(self, image):
    if image.shape[0] == self.image_size:
      return image
    return np.asarray(Image.fromarray(image).resize(
        (self.image_size, self.image_size), Image.BILINEAR))

  def _crop(self, name, top, left, size: int = TILE):
    image, boxes, labels = self.images[name]
    framed, area, kept = crop_ground_truth(boxes, top, left, size)
    if len(kept) > MAX_BOXES:
      raise ValueError(f'A {size} x {size} crop of {name} at ({top}, {left}) '
                       f'holds {len(kept)} boxes, more than '
                       f'tree_crowns.MAX_BOXES = {MAX_BOXES}: raise it.')
    return (image[top:top + size, left:left + size],
            framed.astype(np.float32), labels[kept], area.astype(np.float32))

  def _photometric(self, image, draws):
    """Brightness, contrast and saturation jitter (TF's
    random_adjust_brightness/contrast/saturation), from draws in [0, 1)."""
    brightness, contrast, saturation = draws
    x = image.astype(np.float32)
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = gray[..., None] + (x - gray[..., None]) * _log_uniform(
        SATURATION_RANGE, saturation)
    x = x.mean() + (x - x.mean()) * _log_uniform(CONTRAST_RANGE, contrast)
    x = x + (2 * brightness - 1) * BRIGHTNESS_DELTA * 255
    return np.clip(np.round(x), 0, 255).astype(np.uint8)

  def examples(self, split: str):
    """[(image uint8 [400, 400, 3], boxes float32 [K, 4] normalized, labels
    int32 [K], area float32 [K] pixels)] of a split: 'train' and
    'validation' give their grid tiles, 'test' the two whole images. The
    i-th is the evaluation batches' image_id i (e.g. to draw predictions)."""
    check_choice('split', split, SPLITS)
    if split not in self._examples:
      if split == 'test':
        crops = [self._crop(name, 0, 0) for name in TEST_IMAGES]
      else:
        crops = [self._crop(*window) for window in self._grid(split)]
      self._examples[split] = crops
    return self._examples[split]

  def _ground_truth(self, boxes, labels):
    g = np.zeros((MAX_BOXES, 4), np.float32)
    g[:len(boxes)] = boxes
    padded = np.zeros(MAX_BOXES, np.int32)
    padded[:len(labels)] = labels
    return {'boxes': g, 'labels': padded,
            'box_mask': np.arange(MAX_BOXES) < len(labels)}

  def _stack(self, rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def _checked(self, batch):
    validate_ground_truth(batch['boxes'], batch['labels'], batch['box_mask'],
                          NUM_CLASSES)
    return batch

  def _train_example(self, step, position, draws):
    if not self.augment:
      # Tile `position` of the epoch's order: epochs of num_train tiles,
      # whatever the batch size.
      epoch, index = divmod(step * self.batch_size + position,
                            self.num_train)
      order = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_train)
      image, boxes, labels, _ = self._crop(*self.train_grid[order[index]],
                                           self.crop)
      return {'image': self._resize(image),
              **self._ground_truth(boxes, labels)}
    name, top, left, size, flips, colors = draws
    image, boxes, labels, _ = self._crop(name, top, left, size)
    image, boxes = dihedral(self._resize(image), boxes, *flips)
    if self.photometric:
      image = self._photometric(image, colors)
    return {'image': image, **self._ground_truth(boxes, labels)}

  def train_batches(self, start_step: int = 0):
    """Batch k depends only on (seed, k): its draws are made for the whole
    global batch from a generator keyed by (seed, k), and each process
    builds its slice."""
    regions = self._regions('train')
    # Region sizes (rows, columns); crops of a region are weighted by its
    # positions for a crop_size crop.
    extents = np.array([(end - first, self.images[name][0].shape[1])
                        for name, first, end in regions])
    spans = extents - self.crop + 1
    weights = spans.prod(1) / spans.prod(1).sum()
    largest = int(extents.min())
    first = jax.process_index() * self.local_batch
    step = start_step
    while True:
      rng = np.random.default_rng([self.seed, step])
      which = rng.choice(len(regions), self.batch_size, p=weights)
      offsets = rng.random((self.batch_size, 2))
      flips = rng.random((self.batch_size, 3)) < 0.5
      scales = rng.random(self.batch_size)
      colors = rng.random((self.batch_size, 3))
      rows = []
      for j in range(first, first + self.local_batch):
        name, top, _ = regions[which[j]]
        size = min(largest, round(self.crop * _log_uniform(
            (1 / (1 + self.scale_jitter), 1 + self.scale_jitter), scales[j])))
        dy, dx = (offsets[j] * (extents[which[j]] - size + 1)).astype(int)
        rows.append(self._train_example(
            step, j, (name, top + dy, dx, size, flips[j], colors[j])))
      yield self._checked(self._stack(rows))
      step += 1

  def eval_batches(self, split: str | None = None):
    """Every tile of every 400 x 400 image (validation tiles, test images)
    once, padded and masked; every process yields the same number of
    batches. A row is one crop_size tile of image 'image_id' ('window',
    'core': `condconv_jax.detection.tiles.tile_layout`) with the whole
    image's ground truth; the evaluator stitches the tiles together."""
    split = check_choice('config.eval_split', split or 'validation',
                         EVAL_SPLITS)
    examples = self.examples(split)
    rows = [(i, k) for i in range(len(examples))
            for k in range(len(self.tile_windows))]
    shards = np.array_split(np.arange(len(rows)), jax.process_count())
    mine = shards[jax.process_index()]
    num_batches = math.ceil(len(shards[0]) / self.local_batch)
    for b in range(num_batches):
      ids = mine[b * self.local_batch:(b + 1) * self.local_batch]
      if len(ids):
        batch = self._stack([self._eval_row(*rows[r], *examples[rows[r][0]])
                             for r in ids])
      else:  # this process's shard is done: an all-padding batch
        batch = {k: v[:0] for k, v in self._stack(
            [self._eval_row(0, 0, *examples[0])]).items()}
      yield self._checked(common.pad_batch(batch, self.local_batch))

  def _eval_row(self, index, tile, image, boxes, labels, area):
    gt_area = np.zeros(MAX_BOXES, np.float32)
    gt_area[:len(area)] = area
    top, left, bottom, right = np.round(self.tile_windows[tile] * TILE
                                        ).astype(int)
    return {'image': self._resize(image[top:bottom, left:right]),
            **self._ground_truth(boxes, labels),
            'window': self.tile_windows[tile].astype(np.float32),
            'core': self.tile_cores[tile].astype(np.float32),
            'image_id': np.int64(index),
            'image_size': np.array([TILE, TILE], np.int32),
            'gt_area': gt_area, 'gt_crowd': np.zeros(MAX_BOXES, bool)}


def _log_uniform(bounds, draw: float) -> float:
  """A factor in [low, high], log-uniform, from a draw in [0, 1)."""
  low, high = np.log(bounds[0]), np.log(bounds[1])
  return float(np.exp(low + (high - low) * draw))
