"""Prints the MobileNetV1 SSD's cost, static and CondConv, and the scan of
CondConv placements behind the default (the README's detector tables).

    python -m condconv_jax.detection                  # SSD300, 8 experts
    python -m condconv_jax.detection --image-size 320 --num-experts 4
"""

import argparse

from condconv_jax import cost
from condconv_jax.models import get_model
from condconv_jax.models.paper import PAPER_SSD

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image-size', type=int, default=300)
  parser.add_argument('--num-experts', type=int, default=8)
  args = parser.parse_args()
  shape = (1, args.image_size, args.image_size, 3)
  experts = args.num_experts
  static = cost.count(get_model('ssd_mobilenet_v1'), shape)

  print(f'CondConv placements, {experts} experts, '
        f'{args.image_size}x{args.image_size}:\n')
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
  print(f'\nSSD{args.image_size} beside the paper (COCO minival mAP):\n')
  print('| model | params | MADDs | MADDs over static | paper mAP | '
        'paper cost |')
  print('|---|---:|---:|---:|---:|---:|')
  print(f'| MobileNetV1 1.0 SSD{args.image_size} | {static.params:,} | '
        f'{static.macs / 1e6:.1f}M | | {PAPER_SSD["static_map"]} | |')
  print(f'| CC-MobileNetV1 1.0 SSD{args.image_size} ({experts}) | '
        f'{default.params:,} | {default.macs / 1e6:.1f}M | '
        f'{100 * (default.macs - static.macs) / static.macs:+.1f}% | '
        f'{PAPER_SSD["condconv_map"]} | '
        f'+{100 * PAPER_SSD["relative_cost"]:.0f}% |')


if __name__ == '__main__':
  main()
