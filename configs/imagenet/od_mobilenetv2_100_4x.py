"""OD-MobileNetV2 1.0x (4x): ODConv with 4 kernels in every conv but the stem,
327.1M MADDs (paper count), 11.5M params.

Command:
  python train.py --config configs/imagenet/od_mobilenetv2_100_4x.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: the official runs used 8 GPUs at 256 images per step; any TPU
slice or GPU host works (the learning rate scales with
--config.batch_size). Time: not measured in this project (no ImageNet
here); the progress bar prints images/s and the ETA.
Recipe: the official README's example command for this model (150 epochs, SGD
0.05 cosine, weight decay 4e-5, dropout 0.2, temperature 30 -> 1 over 10
epochs).
Paper top-1: 75.29 (ODConv README, official re-implementation) [V]; static
MobileNetV2 71.65.
"""

from configs.imagenet import common


def get_config():
  return common.dynamic_recipe(
      'od_mobilenetv2_100', 4, common.ODCONV_MOBILENET_RECIPE,
      dropout_rate=0.2)
