"""Fashion-MNIST, in memory: the embedded classification experiment's data.

The IDX files come from Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist), a folder named by config.data_dir or
FASHION_MNIST_DIR, or tfds.load('fashion_mnist') where it can download.
Training batches get random 2-pixel shifts and horizontal flips
(augment='shift_flip') or none ('none').
"""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np

from condconv_jax.choices import check_choice
from condconv_jax.data import common

AUGMENTATIONS = ('shift_flip', 'none')
DIRS = ('/usr/share/datasets/fashion-mnist',)
MEAN, STD = 0.2860, 0.3530
NUM_CLASSES = 10


def make(config) -> common.ArrayDataset:
  """The dataset for config.data_dir, batch_size, seed and augment."""
  augment = check_choice('config.augment', config.augment, AUGMENTATIONS)
  splits = load(config.data_dir or None)
  return common.ArrayDataset(splits['train'], splits['test'], NUM_CLASSES,
                             config.batch_size, config.seed, MEAN, STD,
                             augment=augment != 'none')


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


def load(data_dir: str | None = None):
  """{'train': (images [N,28,28,1] uint8, labels [N]), 'test': ...}."""
  candidates = ([data_dir] if data_dir else
                [os.environ.get('FASHION_MNIST_DIR', ''), *DIRS])
  for directory in filter(None, candidates):
    files = {split: (os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'),
                     os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'))
             for split, prefix in (('train', 'train'), ('test', 't10k'))}
    if all(os.path.exists(p) for pair in files.values() for p in pair):
      return {split: (read_idx(images)[..., None], read_idx(labels))
              for split, (images, labels) in files.items()}
  try:
    # tfds (and the TensorFlow it loads) only for this fallback: seconds of
    # import time the local files never need.
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


def _arrays(batch):
  return batch['image'], batch['label']
