"""DY-ResNet-18: Dynamic Convolution with 4 kernels in every conv but the stem,
1.85G MADDs, 42.7M params (paper; docs/dynamic.md compares our counts).

Command:
  python train.py --config configs/imagenet/dy_resnet18.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: the official runs used 8 GPUs at 256 images per step; any TPU
slice or GPU host works (the learning rate scales with
--config.batch_size). Time: not measured in this project (no ImageNet
here); the progress bar prints images/s and the ETA.
Recipe: the DyConv paper's (100 epochs, SGD 0.1, x0.1 at 30/60/90, weight decay
1e-4, dropout 0.1, temperature 30 -> 1 over 10 epochs) [P]; the unstated parts
from ODConv's (common.py).
Paper top-1: 72.7 (Chen et al. 2020) [P]; static ResNet-18 70.4.
"""

from configs.imagenet import common


def get_config():
  return common.dynamic_recipe('dy_resnet18', 4, common.DYCONV_RESNET_RECIPE)
