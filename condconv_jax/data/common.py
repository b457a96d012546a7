"""What every dataset shares: the interface, and the helpers that build it.

A dataset is an object with:

  task: 'classification' or 'detection', which picks the trainer's task
      (loss and metrics, `condconv_jax.training.tasks`).
  num_classes, image_shape (H, W, C), num_train, steps_per_epoch.
  normalization: a `Normalization` the trainer applies on the device.
  train_batches(start_step) -> iterator of process-local batches; batch k
      depends only on (seed, k), so a run resumed at step s sees exactly the
      batches an uninterrupted run would have seen.
  eval_batches(split=None) -> iterator of process-local batches holding
      every example of the split exactly once: the last batch is padded,
      'mask' [b] marks the real examples (`pad_batch`), and every process
      yields the same number of batches (collectives stay in step).

Batches hold numpy arrays; images are uint8 [b, H, W, C] under 'image' (4x
fewer bytes to move than float32). Each process reads its own shard of
every global batch (`local_batch_size`).
  classification: 'label' int32 [b].
  detection: ground truth padded to G boxes, 'boxes' float32 [b, G, 4]
      normalized [ymin, xmin, ymax, xmax], 'labels' int32 [b, G] (the
      model's class columns, 1 .. num_classes - 1; 0 on padding),
      'box_mask' bool [b, G]; evaluation batches add 'image_id' int64 [b],
      'image_size' int32 [b, 2] (source pixels: COCO's area ranges are in
      pixels), 'gt_area' float32 [b, G] and 'gt_crowd' bool [b, G].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from condconv_jax.choices import check_choice


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

  task = 'classification'

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


# The TF Object Detection API's SSD input scaling, (2 / 255) x - 1
# (`models/ssd_mobilenet_v1_feature_extractor.py` `preprocess`), which both
# detection datasets use.
SSD_NORMALIZATION = Normalization((127.5,) * 3, (127.5,) * 3)


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
