"""COCO 2017 (TFDS coco/2017) for the SSD detector: a tf.data pipeline.

Training follows `samples/configs/ssd_mobilenet_v1_coco.config` of the TF
Object Detection API (tensorflow/models, research/object_detection):
data_augmentation_options random_horizontal_flip and ssd_random_crop with
no options, i.e. the defaults of `core/preprocessor.py` `ssd_random_crop`:
one of 7 (min_object_covered, overlap_thresh) pairs, (0, 0), (.1, .1),
(.3, .3), (.5, .5), (.7, .7), (.9, .9), (1, 1), picked uniformly per image;
with probability 0.15 (random_coef) the image is kept whole; otherwise
`random_crop_image`/`_strict_random_crop_image`: a window of aspect ratio
0.5-2 and 10%-100% of the area covering at least min_object_covered of some
box (`sample_distorted_bounding_box`, 100 attempts, the whole image when
none fits), boxes kept by `common.crop_boxes` (intersection over
their own area >= overlap_thresh, clipped to the window). Then
fixed_shape_resizer: BILINEAR to config.image_size squared (300 x 300 in the
TF config), aspect not kept; evaluation only resizes. TF flips before
cropping; here the crop is drawn first and flipped after, which has the
same distribution (the window sampler is mirror-symmetric) and lets
`decode_and_crop_jpeg` decode only the window.

Deviations, on purpose: images leave as uint8 (the trainer scales them by
`normalization`, 2/255 x - 1, on the device) where TF feeds the float
resize output; `tf.image.resize` uses half-pixel centres where TF1's
`resize_images` did not (its half-pixel shift is not matched by the boxes).

Ground truth is padded to MAX_BOXES with a mask. Training drops boxes of
zero height or width (`dataset_tools/create_coco_tf_record.py` skips them
when it writes COCO for TF) and keeps crowd boxes as ordinary boxes of
their class, as the TF API does (`inputs.py` `transform_input_data` filters
only NaN boxes; `ssd_meta_arch.py` `loss` reads boxes, classes and weights,
never is_crowd). Evaluation keeps every annotation: COCOeval ignores crowd
regions itself (iscrowd) and needs them.

Labels are COCO category ids 1..90, which are the model's class columns
(column 0 is background): TFDS's labels 0-79 are mapped back with
COCO_CATEGORY_IDS.

Resuming: randomness is stateless, keyed by (seed, epoch, position in the
epoch); a mid-epoch resume skips records as JPEG bytes (SkipDecoding).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from condconv_jax.choices import check_choice
from condconv_jax.data import common
from condconv_jax.detection.boxes import validate_ground_truth

AUGMENTATIONS = ('ssd', 'none')
# Splits with annotations ('test' has none); TFDS slices such as
# 'validation[:500]' are accepted for quick looks.
EVAL_SPLITS = ('validation', 'train')
NUM_CLASSES = 91  # background + category ids 1..90 (80 of them used)
# Ground-truth boxes per image, the TF API's max_number_of_boxes default
# (`protos/input_reader.proto`, 100, "at least the maximum amount of boxes in
# the input data"). Not checked here against COCO's own maximum (no COCO
# annotations offline): training clips to it as TF does, evaluation raises.
MAX_BOXES = 100
# The TF API's input_reader.proto shuffle_buffer_size default (records held
# as JPEG bytes, ~160 kB each for COCO).
SHUFFLE_BUFFER = 2048

# `core/preprocessor.py` ssd_random_crop defaults.
SSD_MIN_OBJECT_COVERED = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
SSD_OVERLAP_THRESH = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
SSD_ASPECT_RATIO_RANGE = (0.5, 2.0)
SSD_AREA_RANGE = (0.1, 1.0)
SSD_KEEP_ORIGINAL = 0.15  # random_coef
SSD_MAX_ATTEMPTS = 100

# TFDS coco/2017 label i is the i-th entry of the annotation file's
# 'categories' list (`object_detection/coco.py` in tensorflow_datasets sets
# the ClassLabel names in file order); instances_{train,val}2017.json list
# the 80 categories by increasing id, 1..90 without the 10 ids COCO never
# annotated (12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
    43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)
COCO_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'stop sign',
    'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard',
    'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork',
    'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop',
    'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven',
    'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')


class Coco(common.SquareImages):
  """coco/2017 from TFDS, sharded by process.

  train_batches(start_step) yields, per process, b = batch_size / processes:
    'image' uint8 [b, S, S, 3]; 'boxes' float32 [b, G, 4] normalized
    [ymin, xmin, ymax, xmax]; 'labels' int32 [b, G] COCO category ids (0 on
    padding); 'box_mask' bool [b, G]. S = config.image_size, G = MAX_BOXES.
  eval_batches(split) yields the same keys (no augmentation) plus 'mask' bool
    [b] (False = padding image), 'image_id' int64 [b] (COCO image id),
    'image_size' int32 [b, 2] (original height, width in pixels), 'gt_area'
    float32 [b, G] (COCO's annotation area, the segmentation area that
    pycocotools bins into small/medium/large; TFDS stores it as an integer),
    'gt_crowd' bool [b, G].
  """

  task = 'detection'
  num_classes = NUM_CLASSES
  max_boxes = MAX_BOXES
  normalization = common.SSD_NORMALIZATION

  def __init__(self, config):
    # TensorFlow (tf.data) loads only for the datasets that stream with it.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')  # tf.data only; JAX owns GPUs.
    self.tf, self.tfds = tf, tfds
    self.augment = check_choice('config.augment', config.augment,
                                AUGMENTATIONS) == 'ssd'
    self.eval_split = config.get('eval_split', None) or 'validation'
    _check_eval_split(self.eval_split)
    self.builder = tfds.builder('coco/2017', data_dir=config.data_dir or None)
    try:
      self.num_train = common.tfds_num_examples(self.builder, 'train')
      self.num_eval = common.tfds_num_examples(self.builder, self.eval_split)
    except Exception as error:
      raise FileNotFoundError(_NOT_PREPARED.format(
          data_dir=self.builder.data_dir, error=error)) from error
    _check_label_names(
        self.builder.info.features['objects']['label'].names)
    self.image_size = config.image_size
    self.batch_size = config.batch_size
    self.local_batch = common.local_batch_size(self.batch_size)
    self.seed = config.seed

  def _records(self, split, **kwargs):
    return self.builder.as_dataset(
        split=split, decoders={'image': self.tfds.decode.SkipDecoding()},
        **kwargs)

  def _resize_uint8(self, image):
    tf = self.tf
    image = tf.image.resize(image, [self.image_size] * 2, 'bilinear')
    return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)

  def _objects(self, example):
    """(boxes [n, 4] float32, labels [n] int32 category ids, area [n]
    float32, crowd [n] bool) of an example."""
    tf = self.tf
    objects = example['objects']
    labels = tf.gather(tf.constant(COCO_CATEGORY_IDS, tf.int32),
                       objects['label'])
    return (tf.cast(objects['bbox'], tf.float32), labels,
            tf.cast(objects['area'], tf.float32),
            tf.cast(objects['is_crowd'], tf.bool))

  def _pad(self, values):
    """[n, ...] -> [G, ...]: the first G rows, zero-padded."""
    tf = self.tf
    values = values[:MAX_BOXES]
    pad = MAX_BOXES - tf.shape(values)[0]
    return tf.pad(values, [[0, pad]] + [[0, 0]] * (values.shape.rank - 1))

  def _ground_truth(self, boxes, labels):
    tf = self.tf
    mask = tf.ones(tf.minimum(tf.shape(labels)[0], MAX_BOXES), tf.bool)
    return {'boxes': self._pad(boxes), 'labels': self._pad(labels),
            'box_mask': self._pad(mask)}

  def ssd_crop_choice(self, seeds):
    """(option int32: which (min_object_covered, overlap_thresh) pair,
    crop bool: False keeps the image whole) for stateless seeds [2, 2]."""
    tf = self.tf
    option = tf.random.stateless_uniform([], seeds[0], maxval=len(
        SSD_MIN_OBJECT_COVERED), dtype=tf.int32)
    # TF crops when uniform > random_coef.
    crop = tf.random.stateless_uniform([], seeds[1]) > SSD_KEEP_ORIGINAL
    return option, crop

  def ssd_random_crop(self, seeds, image_shape, boxes):
    """The TF API's ssd_random_crop on box coordinates (the image is cut
    by the caller).

    seeds: int64 [3, 2] stateless seeds; image_shape: int32 [3] (h, w, c);
    boxes: float32 [n, 4] normalized. Returns (window int32 [4] = (top,
    left, height, width) in pixels, boxes [n, 4] in the window's frame,
    keep bool [n]).
    """
    tf = self.tf
    import tensorflow.experimental.numpy as tnp  # pylint: disable=g-import-not-at-top
    option, crop = self.ssd_crop_choice(seeds[:2])
    begin, size, window = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, tf.clip_by_value(boxes, 0.0, 1.0)[None], seed=seeds[2],
        min_object_covered=tf.gather(SSD_MIN_OBJECT_COVERED, option),
        aspect_ratio_range=SSD_ASPECT_RATIO_RANGE,
        area_range=SSD_AREA_RANGE, max_attempts=SSD_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True)
    cropped, keep = common.crop_boxes(
        boxes, window[0, 0], tf.gather(SSD_OVERLAP_THRESH, option), xp=tnp)
    whole = tf.stack([0, 0, image_shape[0], image_shape[1]])
    return (tf.where(crop, tf.stack([begin[0], begin[1], size[0], size[1]]),
                     whole),
            tf.where(crop, cropped, boxes),
            tf.logical_or(keep, tf.logical_not(crop)))

  def _train_example(self, seed, example):
    tf = self.tf
    jpeg = example['image']
    boxes, labels, _, _ = self._objects(example)
    # create_coco_tf_record.py skips boxes of zero width or height.
    real = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, labels = tf.boolean_mask(boxes, real), tf.boolean_mask(labels, real)
    if not self.augment:
      image = self._resize_uint8(tf.io.decode_jpeg(jpeg, channels=3))
      return {'image': image, **self._ground_truth(boxes, labels)}
    seeds = tf.random.experimental.stateless_split(seed, 4)
    window, boxes, keep = self.ssd_random_crop(
        seeds[:3], tf.image.extract_jpeg_shape(jpeg), boxes)
    boxes, labels = tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    # random_horizontal_flip: flips when uniform > 0.5.
    flip = tf.random.stateless_uniform([], seeds[3]) > 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image),
                    lambda: image)
    flipped = tf.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2],
                        1.0 - boxes[:, 1]], axis=1)
    boxes = tf.where(flip, flipped, boxes)
    return {'image': self._resize_uint8(image),
            **self._ground_truth(boxes, labels)}

  def _eval_example(self, example):
    tf = self.tf
    jpeg = example['image']
    boxes, labels, area, crowd = self._objects(example)
    count = tf.shape(labels)[0]
    # Dropping annotations would change the COCO metrics silently.
    check = tf.debugging.assert_less_equal(
        count, MAX_BOXES, message=f'coco.MAX_BOXES ({MAX_BOXES}) is smaller '
        'than the number of annotations of an evaluation image: raise it.')
    with tf.control_dependencies([check]):
      image = self._resize_uint8(tf.io.decode_jpeg(jpeg, channels=3))
    return {'image': image, **self._ground_truth(boxes, labels),
            'image_id': tf.cast(example['image/id'], tf.int64),
            'image_size': tf.cast(tf.image.extract_jpeg_shape(jpeg)[:2],
                                  tf.int32),
            'gt_area': self._pad(area), 'gt_crowd': self._pad(crowd)}

  def _checked(self, batch):
    validate_ground_truth(batch['boxes'], batch['labels'], batch['box_mask'],
                          NUM_CLASSES)
    return batch

  def train_batches(self, start_step: int = 0):
    batches = common.tfds_train_batches(
        self._records, self._train_example, tf=self.tf, tfds=self.tfds,
        seed=self.seed, steps_per_epoch=self.steps_per_epoch,
        local_batch=self.local_batch, shuffle_buffer=SHUFFLE_BUFFER,
        start_step=start_step)
    return map(self._checked, batches)

  def eval_batches(self, split: str | None = None):
    """Every image of `split` (default config.eval_split or 'validation')
    exactly once; every process yields the same number of batches."""
    tf, tfds = self.tf, self.tfds
    split = split or self.eval_split
    _check_eval_split(split)
    total = (self.num_eval if split == self.eval_split else
             common.tfds_num_examples(self.builder, split))
    shards = tfds.even_splits(split, n=jax.process_count(),
                              drop_remainder=False)
    num_batches = math.ceil(
        math.ceil(total / jax.process_count()) / self.local_batch)
    ds = self._records(shards[jax.process_index()], shuffle_files=False)
    ds = ds.map(self._eval_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(self.local_batch).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(common.deterministic_options(tf))
    count = 0
    for batch in tfds.as_numpy(ds):
      count += 1
      yield self._checked(common.pad_batch(batch, self.local_batch))
    g, s = MAX_BOXES, self.image_size
    empty = {'image': np.zeros((0, s, s, 3), np.uint8),
             'boxes': np.zeros((0, g, 4), np.float32),
             'labels': np.zeros((0, g), np.int32),
             'box_mask': np.zeros((0, g), bool),
             'image_id': np.zeros((0,), np.int64),
             'image_size': np.zeros((0, 2), np.int32),
             'gt_area': np.zeros((0, g), np.float32),
             'gt_crowd': np.zeros((0, g), bool)}
    for _ in range(num_batches - count):  # keep every process in step
      yield common.pad_batch(empty, self.local_batch)


def _check_eval_split(split: str):
  check_choice('config.eval_split', split.split('[')[0], EVAL_SPLITS)


def _check_label_names(names):
  """A prepared coco/2017 carries the annotation file's category names:
  they must be COCO_NAMES in order, or COCO_CATEGORY_IDS maps labels to the
  wrong categories. (Unprepared builders and tfds mock data name the labels
  '0'..'79'.)"""
  if list(names) == [str(i) for i in range(len(names))]:
    return
  if tuple(names) != COCO_NAMES:
    raise ValueError(
        'The coco/2017 label names differ from coco.COCO_NAMES, the order '
        'COCO_CATEGORY_IDS assumes (the annotation file\'s categories by '
        f'increasing id); got {list(names)}. Update both tables from the '
        'dataset\'s categories before training or evaluating.')


_NOT_PREPARED = (
    'COCO (TFDS coco/2017) is not prepared under {data_dir}. Prepare it '
    'where there is internet with `tfds build coco/2017 '
    '--data_dir=<data_dir>` (downloads ~25 GB from images.cocodataset.org: '
    'train2017, val2017, test2017 and the annotations), or copy a prepared '
    '<data_dir>/coco/2017/ folder here, then pass '
    '--config.data_dir=<data_dir>. ({error})')
