"""DY-MobileNetV2 1.0x: Dynamic Convolution with 4 kernels in every conv but
the stem, 312.9M MADDs, 11.1M params (paper; docs/dynamic.md compares our
counts).

Command:
  python train.py --config configs/imagenet/dy_mobilenetv2_100.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: the official runs used 8 GPUs at 256 images per step; any TPU
slice or GPU host works (the learning rate scales with
--config.batch_size). Time: not measured in this project (no ImageNet
here); the progress bar prints images/s and the ETA.
Recipe: the DyConv paper's (300 epochs, SGD 0.05 cosine, weight decay 4e-5,
dropout 0.2, temperature 30 -> 1 over 10 epochs) [P]; the unstated parts from
ODConv's (common.py).
Paper top-1: 75.2 (Chen et al. 2020) [P]; static MobileNetV2 72.0.
"""

from configs.imagenet import common


def get_config():
  return common.dynamic_recipe(
      'dy_mobilenetv2_100', 4, common.DYCONV_MOBILENET_RECIPE)
