"""A tiny config and synthetic dataset for fast end-to-end training tests."""

import numpy as np

from condconv_jax.config_schema import get_base_config
from condconv_jax.data import common
from configs import tree_crowns

NUM_CLASSES = 3


def config(**overrides):
  c = get_base_config()
  c.model = 'mobilenet_v1_mini'
  c.width = 0.25
  c.num_experts = 2
  c.dataset = 'fashion_mnist'
  c.image_size = 8
  c.augment = 'shift_flip'
  c.batch_size = 8
  c.num_train_steps = 6
  c.warmup_epochs = 0.0
  c.optimizer = 'sgd'
  c.learning_rate = 0.5
  c.lr_schedule = 'constant'
  c.ema_decay = 0.99
  c.log_every_steps = 2
  c.eval_every_epochs = 0
  c.checkpoint_every_steps = 2
  c.update(overrides)
  return c


def dataset(cfg, num_train=32, num_test=10, seed=0):
  """Random 8x8 images whose class is readable from their mean brightness."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.integers(0, 80, (n, 8, 8, 1)) + 80 * labels[:, None, None,
                                                            None]
    return images.astype(np.uint8), labels.astype(np.int64)

  return common.ArrayDataset(split(num_train), split(num_test), NUM_CLASSES,
                             cfg.batch_size, cfg.seed, mean=0.5, std=0.3)


def detection_config(**overrides):
  """The tree-crown job (configs/tree_crowns.py) at toy size: 64x64 inputs,
  width 0.25, static (compiling CondConv's detector is what costs here; the
  mock COCO test trains one), a few steps."""
  c = tree_crowns.get_config()
  c.num_experts = 0
  c.compare_num_experts = ()
  c.width = 0.25
  c.image_size = 64
  c.batch_size = 4
  c.num_train_steps = 4
  c.warmup_epochs = 0.0
  c.lr_schedule = 'constant'
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_split = 'validation'
  c.update(overrides)
  return c
