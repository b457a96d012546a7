"""CC-MnasNet-A1, 8 experts in the final block and the classifier on ImageNet: 327M MADDs.

Command:
  python train.py --config configs/imagenet/mnasnet_a1_cc8.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: a TPU v3-32/v4-32 slice or an 8-GPU host (global batch 2048;
lower it with --config.batch_size, the learning rate scales with it).
Time: not measured in this project (no ImageNet here); the progress bar
prints images/s and the ETA.
Paper top-1 (CondConv, Yang et al. 2019): 76.2 [U] (baseline 74.9).
"""

from configs.imagenet import common


def get_config():
  return common.tpu_recipe('mnasnet_a1', 8, bn_momentum=0.99)
