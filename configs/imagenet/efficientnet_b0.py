"""EfficientNet-B0, static baseline on ImageNet: 391M MADDs, 5.3M params.

Command:
  python train.py --config configs/imagenet/efficientnet_b0.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 2048;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 77.3 [V].
"""

from configs.imagenet import common


def get_config():
  return common.tpu_recipe(
      'efficientnet_b0', dropout_rate=0.2, drop_path_rate=0.2,
      bn_momentum=0.99, bn_epsilon=1e-3, activation='swish')
