"""CC-ResNet-50, 8 experts in every conv of the last stage on ImageNet: 4.21G MADDs.

Command:
  python train.py --config configs/imagenet/resnet50_cc8.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 1024;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 78.6 [U] (baseline 77.7).
"""

from configs.imagenet import common


def get_config():
  return common.resnet_recipe(8)
