"""MobileNetV1 1.0 SSD300, static on COCO (the TPU recipe of
ssd_mobilenet_v1_300x300_coco14_sync.config: batch 1024, focal loss, cosine,
20k steps).

Command:
  python train.py --config configs/coco/ssd_mobilenet_v1_sync.py --workdir $WORKDIR \
      --config.data_dir=$TFDS_DATA_DIR
  python eval.py --workdir $WORKDIR --detections_png detections.png
Hardware: a TPU v3-32/v4-32 slice or 8+ GPUs (global batch 1024, bfloat16).
Time: not measured in this project (no COCO here); the progress bar prints
images/s and the ETA.
Paper COCO minival mAP (CondConv, Yang et al. 2019): 20.3 (static; TF lists
20.5 on COCO14 minival for this config) [V]. This config evaluates on TFDS
coco/2017 validation (val2017), not that minival, and trains from scratch
(TF fine-tunes from ImageNet weights): see configs/coco/common.py.
"""

from configs.coco import common


def get_config():
  return common.ssd_config(0, common.TF_TPU_RECIPE)
