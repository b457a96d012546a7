"""ImageNet (TFDS imagenet2012) input pipeline on tf.data, built to feed
accelerators.

Images stay JPEG bytes until the crop is known (TFDS SkipDecoding), and
`tf.image.decode_and_crop_jpeg` decodes only the crop: the official TF
EfficientNet/CondConv preprocessing (`preprocessing.py`). Training: the
Inception-style random crop (8%-100% of the area, aspect 3/4-4/3, 10
attempts), falling back to the evaluation center crop when no crop was
found, resized (bicubic) to config.image_size, random horizontal flip.
Evaluation: the central crop of image_size / (image_size + 32) of the
shorter side, resized. Batches leave as uint8 (4x fewer bytes to the device
than float32); the trainer normalizes on the device.

All randomness is stateless and keyed by (seed, epoch, example position),
and each epoch's order by (seed, epoch), so a resumed run sees the batches
an uninterrupted one would; a mid-epoch resume skips the records before it
as undecoded bytes.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from condconv_jax.choices import check_choice
from condconv_jax.data import common

NORMALIZATIONS = {
    # mean, std of RGB in [0, 255]
    'imagenet': ((0.485 * 255, 0.456 * 255, 0.406 * 255),
                 (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    'inception': ((127.5,) * 3, (127.5,) * 3),
}
AUGMENTATIONS = ('inception', 'none')
CROP_PADDING = 32
# Examples shuffled per host, held as JPEG bytes (~110 kB each for ImageNet:
# ~5.5 GB of host memory). Files are shuffled too (TFDS shuffle_files), so
# this mixes records within and across the interleaved files.
SHUFFLE_BUFFER = 50_000


class ImageNet(common.SquareImages):
  """imagenet2012 from TFDS, sharded by process."""

  task = 'classification'
  num_classes = 1000

  def __init__(self, config):
    # TensorFlow (tf.data) loads only for the datasets that stream with it.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')  # tf.data only; JAX owns GPUs.
    self.tf, self.tfds = tf, tfds
    check_choice('config.augment', config.augment, AUGMENTATIONS)
    mean, std = NORMALIZATIONS[check_choice('config.normalization',
                                            config.normalization,
                                            tuple(NORMALIZATIONS))]
    self.normalization = common.Normalization(mean, std)
    self.builder = tfds.builder('imagenet2012',
                                data_dir=config.data_dir or None)
    try:
      self.num_train = common.tfds_num_examples(self.builder, 'train')
      self.num_eval = common.tfds_num_examples(self.builder, 'validation')
    except Exception as error:
      raise FileNotFoundError(_NOT_PREPARED.format(
          data_dir=self.builder.data_dir, error=error)) from error
    self.image_size = config.image_size
    self.batch_size = config.batch_size
    self.local_batch = common.local_batch_size(self.batch_size)
    self.seed = config.seed
    self.augment = config.augment != 'none'

  def _records(self, split, **kwargs):
    return self.builder.as_dataset(
        split=split, decoders={'image': self.tfds.decode.SkipDecoding()},
        **kwargs)

  def _resize_uint8(self, image):
    tf = self.tf
    image = tf.image.resize(image, [self.image_size] * 2, 'bicubic')
    return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)

  def _center_crop(self, jpeg):
    tf = self.tf
    shape = tf.image.extract_jpeg_shape(jpeg)
    h, w = shape[0], shape[1]
    side = tf.cast(self.image_size / (self.image_size + CROP_PADDING) *
                   tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
    return self._resize_uint8(
        tf.image.decode_and_crop_jpeg(jpeg, window, channels=3))

  def _random_crop(self, seed, jpeg):
    tf = self.tf
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    # No crop found in 10 attempts: the sampler returns the whole image, and
    # the official code falls back to the evaluation center crop.
    found = tf.reduce_any(tf.not_equal(size[:2], shape[:2]))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    crop = tf.cond(
        found,
        lambda: self._resize_uint8(
            tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)),
        lambda: self._center_crop(jpeg))
    return tf.image.stateless_random_flip_left_right(crop, seed + 1)

  def train_batches(self, start_step: int = 0):
    def preprocess(seed, example):
      image = (self._random_crop(seed, example['image']) if self.augment
               else self._center_crop(example['image']))
      return {'image': image,
              'label': self.tf.cast(example['label'], self.tf.int32)}

    return common.tfds_train_batches(
        self._records, preprocess, tf=self.tf, tfds=self.tfds, seed=self.seed,
        steps_per_epoch=self.steps_per_epoch, local_batch=self.local_batch,
        shuffle_buffer=SHUFFLE_BUFFER, start_step=start_step)

  def eval_batches(self, split: str | None = None):
    check_choice('config.eval_split', split or 'validation', ('validation',))
    tf, tfds = self.tf, self.tfds
    shards = tfds.even_splits('validation', n=jax.process_count(),
                              drop_remainder=False)
    largest = math.ceil(self.num_eval / jax.process_count())
    num_batches = math.ceil(largest / self.local_batch)
    ds = self._records(shards[jax.process_index()], shuffle_files=False)
    ds = ds.map(lambda ex: {'image': self._center_crop(ex['image']),
                            'label': tf.cast(ex['label'], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(self.local_batch).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(common.deterministic_options(tf))
    count = 0
    for batch in tfds.as_numpy(ds):
      count += 1
      yield common.pad_batch(batch, self.local_batch)
    empty = {'image': np.zeros((0, *self.image_shape), np.uint8),
             'label': np.zeros((0,), np.int32)}
    for _ in range(num_batches - count):  # keep every process in step
      yield common.pad_batch(empty, self.local_batch)


_NOT_PREPARED = (
    'ImageNet (TFDS imagenet2012) is not prepared under {data_dir}. It needs '
    'the manual download TFDS documents: get ILSVRC2012_img_train.tar and '
    'ILSVRC2012_img_val.tar from image-net.org, put them in '
    '<data_dir>/downloads/manual/, run `tfds build imagenet2012 '
    '--data_dir=<data_dir>`, then pass --config.data_dir=<data_dir>. '
    '({error})')
