"""The CondConv paper's COCO detector, MobileNetV1 SSD: its pure functions.

Boxes are normalized [ymin, xmin, ymax, xmax] everywhere. The model
(`get_model('ssd_mobilenet_v1', ...)`, condconv_jax.models.ssd) returns raw
per-anchor outputs {'box_offsets': [B, A, 4], 'class_logits': [B, A, C]}
(column 0 background); the rest are jittable fixed-shape functions:

    anchors = model.anchors(300)                  # = ssd_anchors(300)
    loss, metrics = SSDLoss()(outputs, anchors, gt_boxes, gt_labels, gt_mask)
    detections = postprocess(outputs, anchors)    # boxes/scores/classes/count

Ground truth is padded to a fixed count G with a mask: gt_boxes [B, G, 4],
gt_labels [B, G] in 1 .. C - 1, gt_mask [B, G]; `validate_ground_truth`
checks its values on the host.
"""

from condconv_jax.detection.anchors import (TF_ASPECT_RATIOS,
                                            anchor_box_specs,
                                            feature_map_sizes,
                                            num_anchors_per_location,
                                            ssd_anchors)
from condconv_jax.detection.box_coder import (TF_SCALE_FACTORS, decode_boxes,
                                              encode_boxes)
from condconv_jax.detection.boxes import (clip_boxes, iou,
                                          validate_ground_truth)
from condconv_jax.detection.losses import (TF_COCO_LOSS, TF_TPU_FOCAL_LOSS,
                                           SSDLoss, classification_losses,
                                           hard_negative_mining, smooth_l1)
from condconv_jax.detection.matcher import (IGNORED, UNMATCHED, Targets,
                                            argmax_match, assign_targets)
from condconv_jax.detection.nms import (multiclass_non_max_suppression,
                                        non_max_suppression)
from condconv_jax.detection.postprocess import postprocess

__all__ = [
    'IGNORED', 'TF_ASPECT_RATIOS', 'TF_COCO_LOSS', 'TF_SCALE_FACTORS',
    'TF_TPU_FOCAL_LOSS', 'UNMATCHED', 'SSDLoss', 'Targets', 'anchor_box_specs', 'argmax_match',
    'assign_targets', 'classification_losses', 'clip_boxes', 'decode_boxes',
    'encode_boxes', 'feature_map_sizes', 'hard_negative_mining', 'iou',
    'multiclass_non_max_suppression', 'non_max_suppression',
    'num_anchors_per_location', 'postprocess', 'smooth_l1', 'ssd_anchors',
    'validate_ground_truth',
]
