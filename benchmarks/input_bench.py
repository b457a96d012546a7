"""ImageNet input pipeline rate, images/s per host, on TFDS mock data.

    python -m benchmarks.input_bench

The mock dataset holds JPEGs the size ImageNet's are (375x500 and the like,
quality 90, ~100 kB: smooth random fields plus grain), so decoding costs
what it costs on the real data; tfds' own mock images (~40x20 pixels) would
measure nothing but overhead. It times the training pipeline (random crop,
flip, resize to 224, batching) over --images images after a warm-up batch,
and the first batch of a resume at the last step of an epoch (what a
preempted run waits for before its first step).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from condconv_jax.config_schema import get_base_config
from condconv_jax.data import imagenet

SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (400, 300),
         (281, 500), (500, 333), (375, 500))


def fake_jpegs(tf, count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  jpegs = []
  for i in range(count):
    h, w = SIZES[i % len(SIZES)]
    low = rng.normal(size=(1, h // 16 + 2, w // 16 + 2, 3))
    smooth = tf.image.resize(low, [h, w], 'bicubic')[0].numpy()
    image = 128 + 50 * smooth + rng.normal(scale=18, size=(h, w, 3))
    jpegs.append(tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8),
                                   quality=90).numpy())
  return jpegs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=2048)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--distinct', type=int, default=2048,
                      help='JPEGs in the mock train split')
  args = parser.parse_args()

  jpegs = fake_jpegs(tf, args.distinct)
  labels = np.arange(len(jpegs)) % 1000

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, read_config, kwargs
    ds = tf.data.Dataset.from_tensor_slices({'image': jpegs,
                                             'label': labels})
    if not (decoders and 'image' in decoders):  # the default: decoded
      ds = ds.map(lambda ex: {**ex, 'image': tf.io.decode_jpeg(
          ex['image'], channels=3)})
    return ds

  config = get_base_config()
  config.batch_size = args.batch
  config.image_size = 224
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    pipeline = imagenet.ImageNet(config)
    batches = pipeline.train_batches(0)
    first = next(batches)
    count, start = 0, time.perf_counter()
    while count < args.images:
      batch = next(batches)
      count += len(batch['label'])
    rate = count / (time.perf_counter() - start)
    # Resume at the last step of epoch 1: all but one batch skipped.
    start = time.perf_counter()
    next(pipeline.train_batches(2 * pipeline.steps_per_epoch - 1))
    resume = time.perf_counter() - start
  print('| images/s | first batch of a resume | batch dtype | bytes per image |'
        '\n|---:|---:|---|---:|')
  print(f'| {rate:.0f} | '
        f'{resume:.1f} s | {first["image"].dtype} | '
        f'{first["image"].nbytes / len(first["image"]) / 1e3:.0f} kB |')
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} '
        f'CPUs, batch {args.batch}, {args.images} images, TF {tf.__version__}')


if __name__ == '__main__':
  main()
