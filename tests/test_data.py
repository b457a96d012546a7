"""Data readers and pipelines: IDX files, sharding, padding, determinism."""

import gzip
import struct

import numpy as np
import pytest

from condconv_jax.training import data


def write_idx(path, array):
  header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack(
      f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip_and_fashion_mnist_layout(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n in (('train', 5), ('t10k', 3)):
    images = rng.integers(0, 256, (n, 28, 28))
    labels = rng.integers(0, 10, n)
    write_idx(tmp_path / f'{prefix}-images-idx3-ubyte.gz', images)
    write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte.gz', labels)
    arrays[prefix] = (images, labels)
  splits = data.load_fashion_mnist(str(tmp_path))
  np.testing.assert_array_equal(splits['train'][0][..., 0], arrays['train'][0])
  np.testing.assert_array_equal(splits['test'][1], arrays['t10k'][1])
  assert splits['train'][0].shape == (5, 28, 28, 1)


def test_truncated_idx_file_is_reported(tmp_path):
  path = tmp_path / 'bad-idx1-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(struct.pack('>HBBI', 0, 8, 1, 10) + b'\x01\x02')
  with pytest.raises(ValueError, match='truncated'):
    data.read_idx(str(path))


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setattr(data, 'FASHION_MNIST_DIRS', ())
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  import builtins
  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name.startswith('tensorflow_datasets'):
      raise ImportError('no tfds here')
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_tfds)
  with pytest.raises(FileNotFoundError, match='apt-get install '
                     'dataset-fashion-mnist'):
    data.load_fashion_mnist(str(tmp_path / 'nowhere'))


def _dataset(batch_size=4, n_train=10, n_test=7):
  rng = np.random.default_rng(0)
  split = lambda n: (rng.integers(0, 256, (n, 6, 6, 1)).astype(np.uint8),
                     rng.integers(0, 3, n))
  return data.ArrayDataset(split(n_train), split(n_test), 3, batch_size,
                           seed=1, mean=0.5, std=0.25)


def test_train_batches_depend_only_on_the_step():
  ds = _dataset()
  straight = [b for _, b in zip(range(5), ds.train_batches(0))]
  resumed = [b for _, b in zip(range(2), ds.train_batches(3))]
  for a, b in zip(straight[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # An epoch (2 steps of 4 out of 10) never repeats an example.
  first_epoch = np.concatenate([b['label'] for b in straight[:2]])
  assert len(first_epoch) == 8


def test_eval_batches_pad_and_mask():
  ds = _dataset(batch_size=4, n_test=7)
  batches = list(ds.eval_batches())
  assert [int(b['mask'].sum()) for b in batches] == [4, 3]
  assert all(b['image'].shape == (4, 6, 6, 1) for b in batches)
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, ds.test[1])
