"""CC-MobileNetV1 1.0 SSD300, 8 experts in separable layers 7-13, the extra
layers and the box predictors (+4.2% MADDs) on COCO (the TPU recipe of
ssd_mobilenet_v1_300x300_coco14_sync.config: batch 1024, focal loss, cosine,
20k steps).

Command:
  python train.py --config configs/coco/ssd_mobilenet_v1_cc8_sync.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
  python eval.py --workdir $WORKDIR --detections_png detections.png
Hardware: a TPU v3-32/v4-32 slice or 8+ GPUs (global batch 1024, bfloat16).
Time: not measured in this project (no COCO here); the progress bar prints
images/s and the ETA.
Paper COCO minival mAP (CondConv, Yang et al. 2019): 22.4 (CondConv; static
20.3) [V]. This config evaluates on TFDS coco/2017 validation (val2017), not
that minival, and trains from scratch (TF fine-tunes from ImageNet weights):
see configs/coco/common.py.
"""

from configs.coco import common


def get_config():
  return common.ssd_config(8, common.TF_TPU_RECIPE)
