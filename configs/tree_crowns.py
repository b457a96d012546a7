"""The embedded detection job: tree crowns in aerial images, a small
MobileNetV1 SSD and its CondConv twin.

Command (CPU, 2 cores: minutes for both runs; docs/detection.md gives the
measured times):
  pip download --no-deps deepforest==2.1.0 -d data/deepforest
  python train.py --config configs/tree_crowns.py --workdir /tmp/trees
  python eval.py --workdir /tmp/trees/experts_8 --detections_png trees.png

Data: the annotated NEON images that the MIT-licensed deepforest wheel ships
(read from the wheel; deepforest itself is not installed). Training: random
400x400 crops, with flips and 90-degree rotations, of the two 2019 YELL
images (574 and 279 crowns) but their bottom 400 rows, which are the
validation tiles; test (config.eval_split): OSBS_029 and SOAP_061 (61 and
37 crowns), from two other sites.
Every 400-pixel crop, tile and test image is resized to image_size.
Crowns are 20-60 pixels, so the anchors are smaller than SSD300's, and the
model is trained from scratch (no ImageNet weights here).
It prints test AP and AP50 (COCO metrics, pycocotools) of both models side
by side; docs/detection.md reports 3 seeds.
"""

from condconv_jax.config_schema import get_base_config


def get_config():
  c = get_base_config()
  c.model = 'ssd_mobilenet_v1'
  c.compare_num_experts = (0, 8)
  c.width = 0.25
  c.dataset = 'tree_crowns'
  c.data_dir = 'data/deepforest'
  c.image_size = 192
  c.augment = 'aerial'
  c.eval_split = 'test'
  c.model_kwargs = dict(
      # Crowns are 20-60 of 400 pixels (5-15% of the input): the stride-8
      # map of separable layer 5 instead of layer 13, square anchors from
      # 0.08, a 3x3 predictor, and the focal loss's prior on the classes.
      source_layers=(5, 11), min_scale=0.08, max_scale=0.4,
      aspect_ratios=(1.0,), reduce_boxes_in_lowest_layer=False,
      predictor_kernel_size=3, class_bias_init=-4.6)
  # With IoU 0.5 most crowns match only their single forced anchor; 0.4
  # (RetinaNet's, and deepforest's evaluation IoU) with 0.3-0.4 ignored.
  c.detection_loss = 'tf_tpu_focal'
  c.loss_kwargs = dict(matched_threshold=0.4, unmatched_threshold=0.3)
  # Running statistics that keep up with a thousand steps (TF's 0.9997 is
  # for 200k).
  c.bn_momentum = 0.9
  c.batch_size = 16
  c.num_train_steps = 1000
  c.warmup_epochs = 2.0
  c.optimizer = 'adam'
  c.learning_rate = 0.064  # per 256 examples: Adam at 0.004
  c.lr_schedule = 'cosine'
  c.weight_decay = 4e-5
  c.weight_decay_params = 'kernels_but_depthwise'
  c.label_smoothing = 0.0
  c.ema_decay = 0.0
  c.log_every_steps = 20
  c.eval_every_epochs = 0
  c.checkpoint_every_steps = 100
  return c
