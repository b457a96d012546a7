"""Recipes shared by the ImageNet experiment files (docs/paper.md).

Hardware and time: these configs target a TPU v3/v4 slice or a multi-GPU
host; none has been run to completion in this project (no ImageNet here), so
no training time is claimed. Throughput on your hardware: the progress bar
prints images/s and the ETA from the first hundred steps.
"""

from condconv_jax.config_schema import get_base_config

# The official EfficientNet/MnasNet TPU recipe: RMSProp (TF), 0.016 per 256
# with 5 warm-up epochs, x0.97 every 2.4 epochs, 350 epochs, batch 2048,
# weight decay 1e-5 on every non-BatchNorm parameter, label smoothing 0.1,
# EMA 0.9999, bf16.
TPU_RECIPE = dict(
    dtype='bfloat16', batch_size=2048, num_epochs=350.0, warmup_epochs=5.0,
    optimizer='rmsprop', learning_rate=0.016, lr_schedule='exponential',
    lr_decay_rate=0.97, lr_decay_epochs=2.4, weight_decay=1e-5,
    label_smoothing=0.1, ema_decay=0.9999, checkpoint_every_steps=2000)

# The standard ResNet-50 recipe: SGD with Nesterov momentum 0.9, 0.1 per 256
# with 5 warm-up epochs and cosine decay, 90 epochs, batch 1024, weight decay
# 1e-4 (kernels only), label smoothing 0.1, BN momentum 0.9 (model default).
RESNET_RECIPE = dict(
    dtype='bfloat16', batch_size=1024, num_epochs=90.0, warmup_epochs=5.0,
    optimizer='sgd', nesterov=True, learning_rate=0.1, lr_schedule='cosine',
    weight_decay=1e-4, weight_decay_params='kernels', label_smoothing=0.1,
    ema_decay=0.0,
    checkpoint_every_steps=2000)


def _config(model: str, num_experts: int, values: dict):
  c = get_base_config()
  c.model = model
  c.num_experts = num_experts
  c.update(values)
  return c


def tpu_recipe(model: str, num_experts: int = 0, **overrides):
  return _config(model, num_experts, {**TPU_RECIPE, **overrides})


def resnet_recipe(num_experts: int = 0, **overrides):
  return _config('resnet50', num_experts, {**RESNET_RECIPE, **overrides})
