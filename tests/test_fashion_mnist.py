"""Fashion-MNIST: the IDX reader, the file layout, and the message when the
files are missing."""

import gzip
import struct

import numpy as np
import pytest

from condconv_jax.data import fashion_mnist


def write_idx(path, array):
  header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack(
      f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder, num_train, num_test, seed=0):
  """Random Fashion-MNIST-format files (for command-line tests)."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True)
  for prefix, n in (('train', num_train), ('t10k', num_test)):
    write_idx(folder / f'{prefix}-images-idx3-ubyte.gz',
              rng.integers(0, 256, (n, 28, 28)))
    write_idx(folder / f'{prefix}-labels-idx1-ubyte.gz',
              rng.integers(0, 10, n))
  return folder


def test_idx_round_trip_and_fashion_mnist_layout(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n in (('train', 5), ('t10k', 3)):
    images = rng.integers(0, 256, (n, 28, 28))
    labels = rng.integers(0, 10, n)
    write_idx(tmp_path / f'{prefix}-images-idx3-ubyte.gz', images)
    write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte.gz', labels)
    arrays[prefix] = (images, labels)
  splits = fashion_mnist.load(str(tmp_path))
  np.testing.assert_array_equal(splits['train'][0][..., 0], arrays['train'][0])
  np.testing.assert_array_equal(splits['test'][1], arrays['t10k'][1])
  assert splits['train'][0].shape == (5, 28, 28, 1)


def test_truncated_idx_file_is_reported(tmp_path):
  path = tmp_path / 'bad-idx1-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(struct.pack('>HBBI', 0, 8, 1, 10) + b'\x01\x02')
  with pytest.raises(ValueError, match='truncated'):
    fashion_mnist.read_idx(str(path))


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, 'DIRS', ())
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
    fashion_mnist.load(str(tmp_path / 'nowhere'))

