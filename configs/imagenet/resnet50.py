"""ResNet-50, static baseline on ImageNet: 4.09G MADDs, 25.6M params.

Command:
  python train.py --config configs/imagenet/resnet50.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 1024;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 77.7 [U].
"""

from configs.imagenet import common


def get_config():
  return common.resnet_recipe()
