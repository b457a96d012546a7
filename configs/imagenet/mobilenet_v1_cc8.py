"""CC-MobileNetV1 1.0x, 8 experts in separable layers 7-13 and the classifier on ImageNet: 600M MADDs.

Command:
  python train.py --config configs/imagenet/mobilenet_v1_cc8.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 2048;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 73.7 [U] (baseline 71.9).
"""

from configs.imagenet import common


def get_config():
  return common.tpu_recipe(
      'mobilenet_v1', 8, bn_momentum=0.9, weight_decay=4e-5)
