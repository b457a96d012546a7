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


# Datasets that read config.crop_size and config.scale_jitter.
CROPPING = ('tree_crowns',)


def make_dataset(config):
  """The dataset config.dataset names, built from the config."""
  name = check_choice('config.dataset', config.dataset, tuple(DATASETS))
  if name not in CROPPING and (config.get('crop_size') or
                               config.get('scale_jitter')):
    raise ValueError(f'config.crop_size and config.scale_jitter are for '
                     f'{", ".join(CROPPING)}; {name} does not read them: '
                     'leave them at 0.')
  return DATASETS[name](config)
