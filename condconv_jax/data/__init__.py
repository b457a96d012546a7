"""The datasets a config can name, and the interface they share (`common`).

    dataset = data.make_dataset(config)   # DATASETS[config.dataset](config)

Each entry builds a dataset from the config; the dataset's `task`
('classification' or 'detection') tells the trainer what to learn.
"""

from condconv_jax.choices import check_choice
from condconv_jax.data import coco, fashion_mnist, imagenet, tree_crowns

DATASETS = {
    'fashion_mnist': fashion_mnist.make,
    'imagenet2012': imagenet.ImageNet,
    'coco': coco.Coco,
    'tree_crowns': tree_crowns.TreeCrowns,
}


def make_dataset(config):
  """The dataset config.dataset names, built from the config."""
  return DATASETS[check_choice('config.dataset', config.dataset,
                               tuple(DATASETS))](config)
