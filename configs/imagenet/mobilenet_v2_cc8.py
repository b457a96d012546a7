"""CC-MobileNetV2 1.0x, 8 experts in the final 11 blocks, head and classifier on ImageNet: 330M MADDs, 27.6M params.

Command:
  python train.py --config configs/imagenet/mobilenet_v2_cc8.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 2048;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 74.6 [U] (baseline 71.6).
"""

from configs.imagenet import common


def get_config():
  return common.tpu_recipe('mobilenet_v2', 8, weight_decay=4e-5)
