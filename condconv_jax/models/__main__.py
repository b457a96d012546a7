"""Prints every paper model's parameters and MADDs beside the paper's.

    python -m condconv_jax.models            # the cost table, docs/models.md
    python -m condconv_jax.models --layers efficientnet_b0 --num-experts 8
    python -m condconv_jax.models --layers ssd_mobilenet_v1 --image-size 300
    python -m condconv_jax.models --detector  # SSD300 and its placements
    python -m condconv_jax.models --detector --image-size 320 --num-experts 4
    python -m condconv_jax.models --families  # DyConv/ODConv beside CondConv
"""

import argparse

from condconv_jax.models import DYNAMIC_MODELS, MODELS, cost, get_model
from condconv_jax.models.paper import (DYNAMIC_PAPER_COSTS, FAMILY_COMPARISON,
                                       PAPER_COSTS, PAPER_SSD,
                                       RESNET_V15_EXTRA_MACS)

IMAGE_SHAPE = (1, 224, 224, 3)

BACKBONE = (7, 8, 9, 10, 11, 12, 13)
NONE = dict(condconv_layers=(), condconv_extra=False,
            condconv_predictors=False)
# (label, placement kwargs): backbone layers 7-13, extra layers, box
# predictors and their combinations.
PLACEMENTS = (
    ('backbone 7-13', dict(NONE, condconv_layers=BACKBONE)),
    ('extra layers', dict(NONE, condconv_extra=True)),
    ('box predictors', dict(NONE, condconv_predictors=True)),
    ('backbone 7-13 + extra', dict(NONE, condconv_layers=BACKBONE,
                                   condconv_extra=True)),
    ('backbone 7-13 + predictors', dict(NONE, condconv_layers=BACKBONE,
                                        condconv_predictors=True)),
    ('extra + predictors', dict(NONE, condconv_extra=True,
                                condconv_predictors=True)),
    ('backbone 7-13 + extra + predictors (default)', {}),
    ('backbone 1-13 + extra + predictors',
     dict(condconv_layers=tuple(range(1, 14)))),
)


def routing_macs(c: cost.Cost) -> int:
  """MADDs of the routing functions: their pools and their dense layers."""
  return sum(layer.macs for layer in c.layers
             if layer.kind == 'Routing' or '/routing/' in layer.path)


def _relative(ours, paper):
  return '' if paper is None else f'{100 * (ours - paper) / paper:+.1f}%'


def _millions(value):
  return '' if value is None else f'{value / 1e6:.2f}M'


def detector_tables(image_size: int, experts: int):
  """The MobileNetV1 SSD's cost, static and CondConv, and the scan of
  CondConv placements behind the default (docs/detection.md)."""
  shape = (1, image_size, image_size, 3)
  static = cost.count(get_model('ssd_mobilenet_v1'), shape)

  print(f'CondConv placements, {experts} experts, '
        f'{image_size}x{image_size}:\n')
  print('| placement | params | MADDs | over static | without routing |')
  print('|---|---:|---:|---:|---:|')
  print(f'| none (static) | {static.params / 1e6:.2f}M | '
        f'{static.macs / 1e6:.1f}M | | |')
  for label, kwargs in PLACEMENTS:
    c = cost.count(get_model('ssd_mobilenet_v1', num_experts=experts,
                             **kwargs), shape)
    mixing = c.macs - routing_macs(c) - static.macs
    print(f'| {label} | {c.params / 1e6:.2f}M | {c.macs / 1e6:.1f}M | '
          f'{100 * (c.macs - static.macs) / static.macs:+.2f}% | '
          f'{100 * mixing / static.macs:+.2f}% |')
  print('\n"without routing": the kernel mixing alone, how the paper\'s '
        'classifier\ncosts add up (MobileNetV1: 569M + 31M mixing = 600M).')

  default = cost.count(get_model('ssd_mobilenet_v1', num_experts=experts),
                       shape)
  print(f'\nSSD{image_size} beside the paper (COCO minival mAP):\n')
  print('| model | params | MADDs | MADDs over static | paper mAP | '
        'paper cost |')
  print('|---|---:|---:|---:|---:|---:|')
  print(f'| MobileNetV1 1.0 SSD{image_size} | {static.params:,} | '
        f'{static.macs / 1e6:.1f}M | | {PAPER_SSD["static_map"]} | |')
  print(f'| CC-MobileNetV1 1.0 SSD{image_size} ({experts}) | '
        f'{default.params:,} | {default.macs / 1e6:.1f}M | '
        f'{100 * (default.macs - static.macs) / static.macs:+.1f}% | '
        f'{PAPER_SSD["condconv_map"]} | '
        f'+{100 * PAPER_SSD["relative_cost"]:.0f}% |')


def paper_table(rows):
  print('| model | params | paper | diff | MADDs | paper | diff | source |')
  print('|---|---:|---:|---:|---:|---:|---:|---|')
  for label, name, kwargs, paper_params, paper_macs, source in rows:
    c = cost.count(get_model(name, **kwargs), IMAGE_SHAPE)
    print(f'| {label} | {c.params:,} | {_millions(paper_params)} | '
          f'{_relative(c.params, paper_params)} | {c.macs / 1e6:.1f}M | '
          f'{_millions(paper_macs)} | {_relative(c.macs, paper_macs)} | '
          f'{source} |')


def family_tables():
  """DyConv and ODConv beside their published costs, then each family on
  one backbone beside CondConv (docs/dynamic.md)."""
  paper_table(DYNAMIC_PAPER_COSTS)
  extra = RESNET_V15_EXTRA_MACS / 1e6
  print(f'\nODConv\'s ResNet-50/101 MADDs count ResNet v1; ours count the '
        f'v1.5 model its code\nbuilds, {extra:.1f}M more at 224x224.\n')
  for backbone, variants in FAMILY_COMPARISON:
    print(f'{backbone}:\n')
    print('| conv family | params | MADDs | MADDs over static |')
    print('|---|---:|---:|---:|')
    static = None
    for label, name, kwargs in variants:
      c = cost.count(get_model(name, **kwargs), IMAGE_SHAPE)
      static = static or c.macs
      print(f'| {label} | {c.params / 1e6:.2f}M | {c.macs / 1e6:.1f}M | '
            f'{100 * (c.macs - static) / static:+.1f}% |')
    print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', choices=sorted({**MODELS,
                                                   **DYNAMIC_MODELS}),
                      help='print one model\'s per-layer breakdown instead')
  parser.add_argument('--detector', action='store_true',
                      help='the SSD detector\'s tables instead')
  parser.add_argument('--families', action='store_true',
                      help='DyConv and ODConv beside their papers and '
                      'CondConv instead')
  parser.add_argument('--num-experts', type=int, default=None,
                      help='experts for --layers (default 0) and --detector '
                      '(default 8)')
  parser.add_argument('--image-size', type=int, default=None,
                      help='input size for --layers (default 224) and '
                      '--detector (default 300)')
  args = parser.parse_args()
  if args.detector:
    detector_tables(args.image_size or 300,
                    8 if args.num_experts is None else args.num_experts)
    return
  if args.families:
    family_tables()
    return
  if args.layers:
    size = args.image_size or IMAGE_SHAPE[1]
    print(cost.count(get_model(args.layers, num_experts=args.num_experts),
                     (1, size, size, 3)).table())
    return
  paper_table(PAPER_COSTS)


if __name__ == '__main__':
  main()
