"""The ImageNet pipeline on TFDS mock data: uint8 batches, mid-epoch resume,
option checks, and the official crop's fallback to the center crop."""

import numpy as np
import pytest

from condconv_jax.data import imagenet
from tests import tiny


def _imagenet(**overrides):
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
