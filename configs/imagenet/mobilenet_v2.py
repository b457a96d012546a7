"""MobileNetV2 1.0x, static baseline on ImageNet: 301M MADDs, 3.5M params.

Command:
  python train.py --config configs/imagenet/mobilenet_v2.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 2048;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 71.6 [U].
"""

from configs.imagenet import common


def get_config():
  return common.tpu_recipe('mobilenet_v2', weight_decay=4e-5)
