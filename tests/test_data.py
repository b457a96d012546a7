"""Data readers and pipelines: IDX files, sharding, padding, determinism."""

import gzip
import struct

import numpy as np
import pytest

from condconv_jax.training import data
from tests import tiny


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


def _dataset(batch_size=4, n_train=10, n_test=7, augment=True):
  """Images whose first pixel is the example's index: identity is readable
  after augmentation-free batching."""
  rng = np.random.default_rng(0)

  def split(n):
    images = rng.integers(0, 256, (n, 6, 6, 1)).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images, rng.integers(0, 3, n)

  return data.ArrayDataset(split(n_train), split(n_test), 3, batch_size,
                           seed=1, mean=0.5, std=0.25, augment=augment)


def test_train_batches_depend_only_on_the_step():
  ds = _dataset()
  straight = [b for _, b in zip(range(5), ds.train_batches(0))]
  resumed = [b for _, b in zip(range(2), ds.train_batches(3))]
  for a, b in zip(straight[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_each_epoch_is_a_new_permutation():
  ds = _dataset(batch_size=4, n_train=12, augment=False)  # 3 steps an epoch
  batches = [b for _, b in zip(range(9), ds.train_batches(0))]
  epochs = [np.concatenate([b['image'][:, 0, 0, 0] for b in batches[i:i + 3]])
            for i in (0, 3, 6)]
  for order in epochs:  # every example exactly once
    np.testing.assert_array_equal(np.sort(order), np.arange(12))
  assert len({tuple(order) for order in epochs}) == 3


def test_normalization_happens_on_the_device_in_float32():
  ds = _dataset()
  batch = next(ds.train_batches(0))
  assert batch['image'].dtype == np.uint8
  out = np.asarray(ds.normalization(batch['image']))
  np.testing.assert_allclose(
      out, (batch['image'].astype(np.float64) / 255 - 0.5) / 0.25, rtol=1e-6)
  assert out.dtype == np.float32


def test_eval_batches_pad_and_mask():
  ds = _dataset(batch_size=4, n_test=7)
  batches = list(ds.eval_batches())
  assert [int(b['mask'].sum()) for b in batches] == [4, 3]
  assert all(b['image'].shape == (4, 6, 6, 1) for b in batches)
  assert batches[-1]['image'].dtype == np.uint8
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, ds.test[1])


@pytest.mark.parametrize('field,value,valid', [
    ('dataset', 'imagenet',
     "'fashion_mnist', 'imagenet2012', 'coco', 'deepforest'"),
    ('augment', 'inception', "'shift_flip', 'none'"),
])
def test_unknown_string_options_name_the_valid_ones(field, value, valid):
  cfg = tiny.config(**{field: value})
  with pytest.raises(ValueError, match=f'config.{field} must be one of '
                     f'{valid}; got {value!r}'):
    data.make_dataset(cfg)


# ImageNet (TFDS mock data: random JPEGs of random sizes).

def _imagenet(**overrides):
  from condconv_jax.training import imagenet  # pylint: disable=g-import-not-at-top
  cfg = tiny.config(dataset='imagenet2012', image_size=16, batch_size=2,
                    augment='inception', normalization='inception')
  cfg.update(overrides)
  return imagenet.ImageNet(cfg)


@pytest.fixture
def mock_imagenet():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=8,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def test_imagenet_batches_are_uint8_and_resume_mid_epoch(mock_imagenet):
  ds = _imagenet()
  assert ds.steps_per_epoch == 4
  straight = [b for _, b in zip(range(10), ds.train_batches(0))]
  assert straight[0]['image'].shape == (2, 16, 16, 3)
  assert straight[0]['image'].dtype == np.uint8
  resumed = [b for _, b in zip(range(4), ds.train_batches(6))]  # mid-epoch 1
  for a, b in zip(straight[6:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # Epochs 0 and 1 see the examples in different orders.
  first, second = (np.concatenate([b['image'] for b in straight[i:i + 4]])
                   for i in (0, 4))
  assert not np.array_equal(first, second)


@pytest.mark.parametrize('field,value', [('augment', 'inceptoin'),
                                         ('normalization', 'torch')])
def test_imagenet_string_options_are_checked(mock_imagenet, field, value):
  with pytest.raises(ValueError, match=f'config.{field} must be one of'):
    _imagenet(**{field: value})


def test_random_crop_falls_back_to_the_center_crop():
  """A 400x10 image has no crop of aspect 3/4-4/3 covering 8% of it: the
  official preprocessing then uses the evaluation center crop."""
  tf = pytest.importorskip('tensorflow')
  from condconv_jax.training import imagenet  # pylint: disable=g-import-not-at-top
  pipeline = object.__new__(imagenet.ImageNet)
  pipeline.tf, pipeline.image_size = tf, 16
  rng = np.random.default_rng(0)
  tall = rng.integers(0, 256, (400, 10, 3)).astype(np.uint8)
  jpeg = tf.io.encode_jpeg(tall)
  center = pipeline._center_crop(jpeg).numpy()  # pylint: disable=protected-access
  for seed in range(3):
    crop = pipeline._random_crop(tf.constant([seed, 0], tf.int64), jpeg).numpy()  # pylint: disable=protected-access
    assert (np.array_equal(crop, center) or
            np.array_equal(crop, center[:, ::-1]))
  # The center crop: the central side of 16 / (16 + 32) of the shorter side
  # (10 -> 3 pixels) of the decoded image, resized.
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  side = int(16 / 48 * 10)
  top, left = (400 - side + 1) // 2, (10 - side + 1) // 2
  want = tf.image.resize(decoded[top:top + side, left:left + side], [16, 16],
                         'bicubic').numpy()
  np.testing.assert_array_equal(
      center, np.round(np.clip(want, 0, 255)).astype(np.uint8))
