"""MnasNet-A1, static baseline on ImageNet: 313M MADDs, 3.9M params.

Command:
  python train.py --config configs/imagenet/mnasnet_a1.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 2048;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 74.9 [U].
"""

from configs.imagenet import common


def get_config():
  return common.tpu_recipe('mnasnet_a1', bn_momentum=0.99)
