"""Datasets as deterministic, resumable, per-process batch iterators.

Every dataset offers the same interface:

  train_batches(start_step) -> iterator of {'image', 'label'} process-local
      batches; batch k depends only on (seed, k), so a run resumed at step s
      sees exactly the batches an uninterrupted run would have seen.
  eval_batches() -> iterator of {'image', 'label', 'mask'}: every example of
      the split exactly once; the last batch is padded and masked, and every
      process yields the same number of batches (collectives stay in step).
  normalization: a `Normalization` the trainer applies on the device.

Images are uint8 (4x fewer bytes to move than float32). Each process reads
its own shard of every global batch.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from condconv_jax.choices import check_choice

CLASSIFICATION_DATASETS = ('fashion_mnist', 'imagenet2012')
DETECTION_DATASETS = ('coco', 'deepforest')
DATASETS = CLASSIFICATION_DATASETS + DETECTION_DATASETS
FASHION_MNIST_AUGMENTATIONS = ('shift_flip', 'none')
FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzipped or not), the format of (Fashion-)MNIST."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4:
    raise ValueError(f'{path}: not an IDX file (too short).')
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f'{path}: not an unsigned-byte IDX file.')
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != math.prod(shape):
    raise ValueError(f'{path}: expected {math.prod(shape)} values for shape '
                     f'{shape}, found {body.size} (truncated file?).')
  return body.reshape(shape)


def load_fashion_mnist(data_dir: str | None = None):
  """{'train': (images [N,28,28,1] uint8, labels [N]), 'test': ...}."""
  candidates = ([data_dir] if data_dir else
                [os.environ.get('FASHION_MNIST_DIR', ''),
                 *FASHION_MNIST_DIRS])
  for directory in filter(None, candidates):
    files = {split: (os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'),
                     os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'))
             for split, prefix in (('train', 'train'), ('test', 't10k'))}
    if all(os.path.exists(p) for pair in files.values() for p in pair):
      return {split: (read_idx(images)[..., None], read_idx(labels))
              for split, (images, labels) in files.items()}
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return {split: _arrays(tfds.as_numpy(tfds.load(
        'fashion_mnist', split=split, batch_size=-1)))
            for split in ('train', 'test')}
  except Exception as error:  # No files and no download either.
    raise FileNotFoundError(
        'Fashion-MNIST not found. Install the files with '
        '`apt-get install dataset-fashion-mnist` (they go to '
        '/usr/share/datasets/fashion-mnist), or point --config.data_dir or '
        'FASHION_MNIST_DIR at a folder holding train-images-idx3-ubyte.gz, '
        'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and '
        't10k-labels-idx1-ubyte.gz, or run where tfds.load("fashion_mnist") '
        f'can download. (tfds said: {error})') from error


def tfds_num_examples(builder, split: str) -> int:
  """Examples in a TFDS split (or slice); counted by reading where the
  dataset has no split metadata (tfds mock data)."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    pass
  ds = builder.as_dataset(split=split)
  count = int(ds.cardinality())
  return count if count >= 0 else sum(1 for _ in ds)


class SquareImages:
  """image_shape and steps_per_epoch of a dataset of image_size x
  image_size RGB examples whose epoch is num_train // batch_size steps
  (ImageNet, COCO, the tree crowns)."""

  image_size: int
  num_train: int
  batch_size: int

  @property
  def image_shape(self):
    return (self.image_size, self.image_size, 3)

  @property
  def steps_per_epoch(self):
    return max(1, self.num_train // self.batch_size)


def deterministic_options(tf):
  """tf.data options that keep the order fixed (exact resume)."""
  options = tf.data.Options()
  options.deterministic = True
  return options


def tfds_train_batches(records, preprocess, *, tf, tfds, seed: int,
                       steps_per_epoch: int, local_batch: int,
                       shuffle_buffer: int, start_step: int = 0):
  """Endless NumPy training batches of this process's shard of a TFDS
  'train' split, epoch after epoch, from step `start_step`.

  records(split, **as_dataset_kwargs) -> the undecoded records (JPEGs stay
  bytes); preprocess(seed, example) -> features, with `seed` a stateless
  seed pair that depends on (config seed, epoch, the example's index over
  all hosts) only, so a resumed run sees the same examples and draws.
  """
  epoch, skip = divmod(start_step, steps_per_epoch)
  split = tfds.split_for_jax_process('train', drop_remainder=True)
  # Every host draws its own crops and flips: the example's index over all
  # hosts (this host's index interleaved with the others').
  hosts, host = jax.process_count(), jax.process_index()
  options = deterministic_options(tf)
  while True:
    read = tfds.ReadConfig(shuffle_seed=seed + epoch)
    # This process's shard holds at least steps * local_batch records.
    ds = records(split, shuffle_files=True, read_config=read)
    ds = ds.shuffle(shuffle_buffer, seed=seed + epoch)
    # Skipped records are still JPEG bytes here: nothing is decoded.
    ds = ds.take(steps_per_epoch * local_batch).skip(skip * local_batch)
    ds = ds.enumerate(skip * local_batch)

    def seeded(index, example, epoch=epoch):
      pair = tf.stack([tf.cast(seed, tf.int64) * 100003 + epoch,
                       index * hosts + host])
      return preprocess(pair, example)

    ds = ds.map(seeded, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(options)
    yield from tfds.as_numpy(ds)
    epoch, skip = epoch + 1, 0


def local_batch_size(batch_size: int) -> int:
  """This process's share of the global batch."""
  if batch_size % jax.process_count():
    raise ValueError(f'batch_size ({batch_size}) must be divisible by the '
                     f'number of processes ({jax.process_count()}).')
  return batch_size // jax.process_count()


def _arrays(batch):
  return batch['image'], batch['label']


@dataclasses.dataclass(frozen=True)
class Normalization:
  """uint8 images -> (x - mean) / std per channel, in float32 on the device.

  mean, std: in [0, 255] units, one value or one per channel.
  """

  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __call__(self, images):
    return ((jnp.asarray(images, jnp.float32) - jnp.asarray(self.mean)) /
            jnp.asarray(self.std))


@dataclasses.dataclass
class ArrayDataset:
  """An in-memory image classification dataset (uint8 images).

  mean, std: of the pixel values scaled to [0, 1] (the usual statement).
  """

  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  num_classes: int
  batch_size: int  # global
  seed: int
  mean: float
  std: float
  augment: bool = True

  def __post_init__(self):
    self.local_batch = local_batch_size(self.batch_size)
    self.normalization = Normalization((255.0 * self.mean,),
                                       (255.0 * self.std,))

  @property
  def image_shape(self):
    return self.train[0].shape[1:]

  @property
  def num_train(self):
    return len(self.train[1])

  @property
  def num_eval(self):
    return len(self.test[1])

  @property
  def steps_per_epoch(self):
    return self.num_train // self.batch_size

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    images, labels = self.train
    steps = self.steps_per_epoch
    step = start_step
    while True:
      epoch, index = divmod(step, steps)
      # One global permutation per epoch; each process takes its slice of
      # every global batch, so the global batch is independent of P.
      order = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_train)
      start = index * self.batch_size + jax.process_index() * self.local_batch
      idx = order[start:start + self.local_batch]
      batch_images = images[idx]
      if self.augment:
        batch_images = self._augment(batch_images, step)
      yield {'image': batch_images, 'label': labels[idx].astype(np.int32)}
      step += 1

  def _augment(self, images, step):
    """Random 2-pixel-shift crops and horizontal flips. The draws are made
    for the whole global batch and sliced, so the global batch does not
    depend on the number of processes."""
    rng = np.random.default_rng([self.seed, step, 1])
    shifts = rng.integers(0, 5, (self.batch_size, 2))
    flips = rng.random(self.batch_size) < 0.5
    mine = slice(jax.process_index() * self.local_batch,
                 (jax.process_index() + 1) * self.local_batch)
    shifts, flips = shifts[mine], flips[mine]
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    out = np.empty_like(images)
    for i in range(n):
      crop = padded[i, shifts[i, 0]:shifts[i, 0] + h,
                    shifts[i, 1]:shifts[i, 1] + w]
      out[i] = crop[:, ::-1] if flips[i] else crop
    return out

  def eval_batches(self, split: str | None = None) -> Iterator[dict]:
    check_choice('config.eval_split', split or 'test', ('test',))
    images, labels = self.test
    shards = np.array_split(np.arange(self.num_eval), jax.process_count())
    mine = shards[jax.process_index()]
    num_batches = math.ceil(max(len(s) for s in shards) / self.local_batch)
    for b in range(num_batches):
      idx = mine[b * self.local_batch:(b + 1) * self.local_batch]
      yield pad_batch({'image': images[idx],
                       'label': labels[idx].astype(np.int32)},
                      self.local_batch)


def pad_batch(batch: dict, size: int) -> dict:
  """Pads every array of a short batch to `size` rows with zeros and adds
  'mask' [size] (True = a real example)."""
  n = len(next(iter(batch.values())))
  padded = {}
  for key, value in batch.items():
    value = np.asarray(value)
    padded[key] = np.zeros((size, *value.shape[1:]), value.dtype)
    padded[key][:n] = value
  padded['mask'] = np.arange(size) < n
  return padded


def make_dataset(config):
  """The dataset a config names."""
  check_choice('config.dataset', config.dataset, DATASETS)
  if config.dataset == 'fashion_mnist':
    augment = check_choice('config.augment', config.augment,
                           FASHION_MNIST_AUGMENTATIONS)
    splits = load_fashion_mnist(config.data_dir or None)
    return ArrayDataset(splits['train'], splits['test'], 10, config.batch_size,
                        config.seed, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                        augment=augment != 'none')
  if config.dataset == 'coco':
    from condconv_jax.training import coco  # pylint: disable=g-import-not-at-top
    return coco.Coco(config)
  if config.dataset == 'deepforest':
    from condconv_jax.training import deepforest  # pylint: disable=g-import-not-at-top
    return deepforest.TreeCrowns(config)
  from condconv_jax.training import imagenet  # pylint: disable=g-import-not-at-top
  return imagenet.ImageNet(config)
