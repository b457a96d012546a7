"""CC-MobileNetV1 0.5x, 8 experts (the 1.0x placement) on ImageNet: the paper's first version reports 71.6 at +27% cost with an unstated setting; this file uses the 1.0x placement.

Command:
  python train.py --config configs/imagenet/mobilenet_v1_050_cc8.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 2048;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 71.6 [V, first version] (baseline 63.8).
"""

from configs.imagenet import common


def get_config():
  return common.tpu_recipe(
      'mobilenet_v1', 8, width=0.5, bn_momentum=0.9, weight_decay=4e-5)
