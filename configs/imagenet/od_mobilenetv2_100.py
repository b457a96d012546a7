"""OD-MobileNetV2 1.0x (1x): ODConv with 1 kernel in every conv but the stem,
311.8M MADDs (paper count), 4.94M params.

Command:
  python train.py --config configs/imagenet/od_mobilenetv2_100.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: the official runs used 8 GPUs at 256 images per step; any TPU
slice or GPU host works (the learning rate scales with
--config.batch_size). Time: not measured in this project (no ImageNet
here); the progress bar prints images/s and the ETA.
Recipe: the official README's MobileNetV2 command (150 epochs, SGD 0.05 cosine,
weight decay 4e-5, temperature 30 -> 1 over 10 epochs); dropout 0.2, the
official OD_MobileNetV2 default.
Paper top-1: 74.74 (ODConv README, official re-implementation) [V]; static
MobileNetV2 71.65.
"""

from configs.imagenet import common


def get_config():
  return common.dynamic_recipe(
      'od_mobilenetv2_100', 1, common.ODCONV_MOBILENET_RECIPE,
      dropout_rate=0.2)
