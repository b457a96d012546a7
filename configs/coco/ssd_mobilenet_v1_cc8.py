"""CC-MobileNetV1 1.0 SSD300, 8 experts in separable layers 7-13, the extra
layers and the box predictors (+4.2% MADDs) on COCO (the TF Object Detection
API's ssd_mobilenet_v1_coco.config recipe: batch 24, RMSProp, 200k steps).

Command:
  python train.py --config configs/coco/ssd_mobilenet_v1_cc8.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
  python eval.py --workdir $WORKDIR --detections_png detections.png
Hardware: one GPU (global batch 24, float32); any number of devices whose count divides the batch.
Time: not measured in this project (no COCO here); the progress bar prints
images/s and the ETA.
Paper COCO minival mAP (CondConv, Yang et al. 2019): 22.4 (CondConv; static
20.3) [V]. This config evaluates on TFDS coco/2017 validation (val2017), not
that minival, and trains from scratch (TF fine-tunes from ImageNet weights):
see configs/coco/common.py.
"""

from configs.coco import common


def get_config():
  return common.ssd_config(8, common.TF_COCO_RECIPE)
