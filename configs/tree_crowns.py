"""The embedded detection job: tree crowns in aerial images, a small
MobileNetV1 SSD and its CondConv twin, three seeds each.

Command (18 minutes 23 seconds of wall time for all six runs on the
2-core AMD EPYC VM, family 25 model 17, 2026-12-06; the results:
docs/detection.md):
  pip download --no-deps deepforest==2.1.0 -d data/deepforest
  python train.py --config configs/tree_crowns.py --workdir /tmp/trees
  python eval.py --workdir /tmp/trees/seed_0 --pr_png pr.png \
      --detections_png trees.png

Data: the annotated NEON images that the MIT-licensed deepforest wheel ships
(read from the wheel; deepforest itself is not installed). Training: random
192x192 crops at native scale, with flips and 90-degree rotations, of the
two 2019 YELL images (574 and 279 crowns) but their bottom 400 rows, which
are the 10 validation tiles; test (config.eval_split): OSBS_029 and
SOAP_061 (61 and 37 crowns), from two other sites. Validation tiles and
test images (400x400) are detected on 3 x 3 overlapping 192-pixel tiles
and stitched. Crowns are 15-75 pixels, so two fine feature maps with
anchors fitted to them; the model is trained from scratch (no ImageNet
weights here).
It prints, per run and as mean and spread over the seeds, validation AP50,
test AP and AP50 (COCO metrics, pycocotools) and deepforest's box precision
and recall at IoU 0.4 over a score threshold chosen on validation.
"""

from condconv_jax.config_schema import get_base_config


def get_config():
  c = get_base_config()
  c.model = 'ssd_mobilenet_v1'
  c.compare_num_experts = (0, 8)
  c.compare_seeds = (0, 1, 2)
  c.width = 0.5
  c.dataset = 'tree_crowns'
  c.data_dir = 'data/deepforest'
  # Native scale: 192-pixel crops and evaluation tiles at 192 x 192, so
  # crowns keep their 15-75 pixels.
  c.image_size = 192
  c.crop_size = 192
  c.augment = 'aerial'
  c.eval_split = 'test'
  c.model_kwargs = dict(
      # Stride-8 and stride-16 maps only (separable layers 5 and 11, no
      # extra layers), square anchors fitted to the crowns' sizes
      # (benchmarks/tree_crown_anchors.py: 99% of crowns have an anchor at
      # IoU >= 0.4), a 3x3 predictor, and the focal loss's class prior.
      source_layers=(5, 11), extra_depths=(), anchor_scales=(0.1, 0.25),
      aspect_ratios=(1.0,), reduce_boxes_in_lowest_layer=False,
      predictor_kernel_size=3, class_bias_init=-4.6)
  # With IoU 0.5 most crowns match only their single forced anchor; 0.4
  # (RetinaNet's, and deepforest's evaluation IoU) with 0.3-0.4 ignored.
  c.detection_loss = 'tf_tpu_focal'
  c.loss_kwargs = dict(matched_threshold=0.4, unmatched_threshold=0.3)
  # Crowns touch but rarely overlap by much: NMS at IoU 0.3 (chosen on
  # validation) keeps one box per crown where 0.6 kept several.
  c.postprocess_kwargs = dict(iou_threshold=0.3)
  # Running statistics that keep up with a thousand steps (TF's 0.9997 is
  # for 200k).
  c.bn_momentum = 0.9
  c.batch_size = 16
  c.num_train_steps = 700
  # 100 steps: with 20, the CondConv twin's first steps at this rate blew
  # up (loss 6.9, gradient norm 17) and it never recovered (seed 0).
  c.warmup_epochs = 10.0
  c.optimizer = 'adam'
  c.learning_rate = 0.768  # per 256 examples: Adam at 0.048
  c.lr_schedule = 'cosine'
  c.weight_decay = 4e-5
  c.weight_decay_params = 'kernels_but_depthwise'
  c.label_smoothing = 0.0
  c.ema_decay = 0.0
  c.log_every_steps = 20
  c.eval_every_epochs = 0
  c.checkpoint_every_steps = 100
  return c
