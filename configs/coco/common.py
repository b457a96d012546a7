"""The TF Object Detection API's recipes for MobileNetV1 SSD300 on COCO,
transcribed from tensorflow/models research/object_detection/samples/configs
(docs/paper.md). TF counts in steps at a fixed batch and does not scale
the learning rate with it; here durations are in epochs of TFDS coco/2017
train and the learning rate is per 256 examples, so both follow an
overridden batch size.

Data: TFDS coco/2017 (`tfds build coco/2017 --data_dir=$TFDS_DATA_DIR`,
~25 GB of downloads). Its validation split (val2017, 5,000 images) is NOT
the paper's minival (TF's ~8k-image subset of val2014): numbers from these
configs are on val2017.
Initialization: TF starts both recipes from an ImageNet classification
checkpoint (fine_tune_checkpoint); these configs train from scratch, so
expect less than the paper's mAP unless the backbone is pre-trained.
"""

from condconv_jax.config_schema import get_base_config

COCO_TRAIN = 118_287  # TFDS coco/2017 train images


def _epochs(steps: float, batch: int) -> float:
  return steps * batch / COCO_TRAIN


# ssd_mobilenet_v1_coco.config: batch 24, 200k steps, RMSProp 0.004
# (momentum 0.9, decay 0.9, epsilon 1.0), x0.95 every 800,720 steps (never
# reached in 200k: the config says so), L2 4e-5 on every kernel (the
# feature extractor calls mobilenet_v1_arg_scope with
# regularize_depthwise=True), BN decay 0.9997
# (the model's default), no EMA, sigmoid loss with 3:1 hard negative mining.
TF_COCO_RECIPE = dict(
    batch_size=24, num_epochs=_epochs(200_000, 24), warmup_epochs=0.0,
    optimizer='rmsprop', learning_rate=0.004 * 256 / 24, momentum=0.9,
    rmsprop_decay=0.9, rmsprop_epsilon=1.0, lr_schedule='exponential',
    lr_decay_rate=0.95, lr_decay_epochs=_epochs(800_720, 24),
    weight_decay=4e-5, weight_decay_params='kernels',
    label_smoothing=0.0, ema_decay=0.0, detection_loss='tf_coco',
    dtype='float32')

# ssd_mobilenet_v1_300x300_coco14_sync.config (TPU, "20.5 mAP on COCO14
# minival"): batch 1024, 20k steps, momentum 0.9, cosine from 0.9 with a
# 1k-step warm-up from 0.3, L2 4e-5 on every kernel (its hyperparams
# override the backbone's), BN decay 0.97, focal loss (alpha 0.75, gamma 2,
# no mining), class bias -4.6, predictor init normal(0.01), bf16 on TPU.
TF_TPU_RECIPE = dict(
    batch_size=1024, num_epochs=_epochs(20_000, 1024),
    warmup_epochs=_epochs(1_000, 1024), warmup_start=0.3 / 0.9,
    optimizer='sgd', nesterov=False, momentum=0.9,
    learning_rate=0.9 * 256 / 1024, lr_schedule='cosine', weight_decay=4e-5,
    weight_decay_params='kernels', label_smoothing=0.0, ema_decay=0.0,
    bn_momentum=0.97, detection_loss='tf_tpu_focal', dtype='bfloat16')


def ssd_config(num_experts: int, recipe: dict):
  c = get_base_config()
  c.model = 'ssd_mobilenet_v1'
  c.num_experts = num_experts
  c.dataset = 'coco'
  c.image_size = 300
  c.augment = 'ssd'  # random horizontal flip + ssd_random_crop
  c.update(recipe)
  if recipe['detection_loss'] == 'tf_tpu_focal':
    c.model_kwargs = dict(class_bias_init=-4.6, predictor_init_stddev=0.01,
                          predictor_init_truncated=False)
  c.log_every_steps = 100
  c.eval_every_epochs = 5
  c.checkpoint_every_steps = 2000
  return c
