"""The dataset interface's shared parts (condconv_jax.data.common) on an
in-memory dataset: determinism, epochs, device-side normalization, padded
evaluation batches; and the registry's option checks."""

import numpy as np
import pytest

from condconv_jax import data
from condconv_jax.data import common
from condconv_jax.training import trainer
from tests import tiny
from tests.test_fashion_mnist import write_fashion_mnist


def _dataset(batch_size=4, n_train=10, n_test=7, augment=True):
  """Images whose first pixel is the example's index: identity is readable
  after augmentation-free batching."""
  rng = np.random.default_rng(0)

  def split(n):
    images = rng.integers(0, 256, (n, 6, 6, 1)).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images, rng.integers(0, 3, n)

  return common.ArrayDataset(split(n_train), split(n_test), 3, batch_size,
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
     "'fashion_mnist', 'imagenet2012', 'coco', 'tree_crowns'"),
    ('augment', 'inception', "'shift_flip', 'none'"),
])
def test_unknown_string_options_name_the_valid_ones(field, value, valid):
  cfg = tiny.config(**{field: value})
  with pytest.raises(ValueError, match=f'config.{field} must be one of '
                     f'{valid}; got {value!r}'):
    data.make_dataset(cfg)


@pytest.mark.parametrize('field,value', [('crop_size', 192),
                                         ('scale_jitter', 0.2)])
def test_crop_settings_on_a_dataset_that_ignores_them_are_an_error(
    field, value):
  cfg = tiny.config(dataset='fashion_mnist', **{field: value})
  with pytest.raises(ValueError, match='tree_crowns; fashion_mnist does not '
                     'read them'):
    data.make_dataset(cfg)


# The task each registered dataset declares: what the trainer learns on it.
TASKS = {'fashion_mnist': 'classification', 'imagenet2012': 'classification',
         'coco': 'detection', 'tree_crowns': 'detection'}


def test_every_registered_dataset_declares_its_task(tmp_path):
  assert set(data.DATASETS) == set(TASKS)
  for name, build in data.DATASETS.items():
    if name == 'fashion_mnist':  # built by a function: build one
      folder = write_fashion_mnist(tmp_path / 'fashion', 8, 4)
      build = build(tiny.config(data_dir=str(folder)))
    assert build.task == TASKS[name], name


def test_a_dataset_without_a_task_is_named_in_the_error():
  class Unlabelled:
    num_classes = 3

  with pytest.raises(ValueError, match="Unlabelled.task must be one of "
                     "'classification', 'detection'; got None"):
    trainer.make_task(tiny.config(), Unlabelled(), model=None)
