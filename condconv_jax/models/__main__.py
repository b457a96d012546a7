"""Prints every paper model's parameters and MADDs beside the paper's.

    python -m condconv_jax.models            # the README's model table
    python -m condconv_jax.models --layers efficientnet_b0 --num-experts 8
    python -m condconv_jax.models --layers ssd_mobilenet_v1 --image-size 300

The detector's table (SSD300 and its CondConv placements) is
`python -m condconv_jax.detection`.
"""

import argparse

from condconv_jax import cost
from condconv_jax.models import MODELS, get_model
from condconv_jax.models.paper import PAPER_COSTS

IMAGE_SHAPE = (1, 224, 224, 3)


def _relative(ours, paper):
  return '' if paper is None else f'{100 * (ours - paper) / paper:+.1f}%'


def _millions(value):
  return '' if value is None else f'{value / 1e6:.2f}M'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', choices=sorted(MODELS),
                      help='print one model\'s per-layer breakdown instead')
  parser.add_argument('--num-experts', type=int, default=0)
  parser.add_argument('--image-size', type=int, default=IMAGE_SHAPE[1],
                      help='input size for --layers (the table is at 224)')
  args = parser.parse_args()
  if args.layers:
    shape = (1, args.image_size, args.image_size, 3)
    print(cost.count(get_model(args.layers, num_experts=args.num_experts),
                     shape).table())
    return
  print('| model | params | paper | diff | MADDs | paper | diff | source |')
  print('|---|---:|---:|---:|---:|---:|---:|---|')
  for label, name, kwargs, paper_params, paper_macs, source in PAPER_COSTS:
    c = cost.count(get_model(name, **kwargs), IMAGE_SHAPE)
    print(f'| {label} | {c.params:,} | {_millions(paper_params)} | '
          f'{_relative(c.params, paper_params)} | {c.macs / 1e6:.1f}M | '
          f'{_millions(paper_macs)} | {_relative(c.macs, paper_macs)} | '
          f'{source} |')


if __name__ == '__main__':
  main()
