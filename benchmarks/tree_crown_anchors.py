"""What the tree-crown detector's anchors can reach: per split, the share of
ground-truth crowns whose best anchor has IoU >= the loss's matched
threshold (the ones the SSD loss trains as positives by IoU, before the
forced best-anchor match), by crown size.

  python benchmarks/tree_crown_anchors.py [--config configs/tree_crowns.py]

Each evaluation tile is scored the way the model sees it: its crowns whose
centre lies in the tile's core, in tile coordinates. Pure NumPy and the
model's anchor arithmetic; no training.
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np

from condconv_jax.data import tree_crowns
from condconv_jax.detection import tiles
from condconv_jax.detection.boxes import iou
from condconv_jax.models import get_model

SIZE_BINS = (0, 24, 32, 48, 64, 1000)  # crown side, source pixels


def load_config(path):
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tile_crowns(dataset, split):
  """Ground-truth boxes [N, 4] normalized in their tile, with their sides
  [N] in source pixels, over every tile of a split's images."""
  boxes, sides = [], []
  for _, image_boxes, _, _ in dataset.examples(split):
    pixels = image_boxes * tree_crowns.TILE
    for window, core in zip(dataset.tile_windows, dataset.tile_cores):
      keep = tiles.in_core(image_boxes, core)
      local = (image_boxes[keep] - np.tile(window[:2], 2)) / np.tile(
          window[2:] - window[:2], 2)
      boxes.append(np.clip(local, 0, 1))
      side = np.sqrt((pixels[keep, 2] - pixels[keep, 0]) *
                     (pixels[keep, 3] - pixels[keep, 1]))
      sides.append(side)
  return np.concatenate(boxes), np.concatenate(sides)


def best_anchor_iou(boxes, anchors):
  """[N] the highest IoU of each box [N, 4] with any anchor [A, 4]."""
  return np.asarray(iou(boxes, anchors)).max(axis=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/tree_crowns.py')
  parser.add_argument('--data_dir', default=None)
  args = parser.parse_args()
  config = load_config(args.config)
  if args.data_dir is not None:
    config.data_dir = args.data_dir
  dataset = tree_crowns.TreeCrowns(config)
  model = get_model(config.model, num_classes=dataset.num_classes,
                    width=config.width, **config.model_kwargs.to_dict())
  anchors = model.anchors(config.image_size)
  threshold = config.loss_kwargs.get('matched_threshold', 0.5)
  print(f'{len(anchors)} anchors at {config.image_size}; crop_size '
        f'{dataset.crop}; matched threshold {threshold}')
  print('| split | crowns | ' + ' | '.join(
      f'{lo}-{hi} px' if hi < 1000 else f'>= {lo} px'
      for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:])) + ' | all |')
  print('|---|---:|' + '---:|' * len(SIZE_BINS))
  for split in ('train', 'validation', 'test'):
    boxes, sides = tile_crowns(dataset, split)
    best = best_anchor_iou(boxes, anchors)
    reached = best >= threshold
    cells = []
    for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
      in_bin = (sides >= lo) & (sides < hi)
      cells.append(f'{reached[in_bin].mean():.0%} of {in_bin.sum()}'
                   if in_bin.any() else '-')
    print(f'| {split} | {len(boxes)} | {" | ".join(cells)} | '
          f'{reached.mean():.0%} |')


if __name__ == '__main__':
  main()
