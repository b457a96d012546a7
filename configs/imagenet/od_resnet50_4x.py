"""OD-ResNet-50 (4x): ODConv with 4 kernels in every conv of the residual
blocks, 4.08G MADDs (v1 count), 90.7M params.

Command:
  python train.py --config configs/imagenet/od_resnet50_4x.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
Hardware: the official runs used 8 GPUs at 256 images per step; any TPU
slice or GPU host works (the learning rate scales with
--config.batch_size). Time: not measured in this project (no ImageNet
here); the progress bar prints images/s and the ETA.
Recipe: the official README's ResNet command (100 epochs, SGD 0.1, x0.1 at
30/60/90, weight decay 1e-4, temperature 30 -> 1 over 10 epochs); its dropout
is not stated for this model: 0.1, the official OD_ResNet default.
Paper top-1: 78.50 (ODConv README, official re-implementation) [V]; static
ResNet-50 76.23.
"""

from configs.imagenet import common


def get_config():
  return common.dynamic_recipe(
      'od_resnet50', 4, common.ODCONV_RESNET_RECIPE, dropout_rate=0.1)
