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


# The official ODConv recipes (OSVAI/ODConv README commands and main.py;
# docs/paper.md): SGD with momentum 0.9 (no Nesterov), 256 per step, no
# warm-up, label smoothing or EMA, weight decay on every parameter
# (PyTorch's SGD weight_decay), float32 (--use_amp optional), and the
# softmax temperature linear from 30 to 1 over the first 10 epochs.
# ResNets: 100 epochs, 0.1, x0.1 at epochs 30/60/90, weight decay 1e-4.
# MobileNetV2: 150 epochs, 0.05 with cosine decay, weight decay 4e-5. The
# official cosine is stepped once per epoch; ours is per step (the two
# differ by under one epoch's decay at any step).
TEMPERATURE_ANNEALING = dict(temperature_initial=30.0, temperature_final=1.0,
                             temperature_epochs=10.0)
ODCONV_COMMON = dict(
    dtype='float32', batch_size=256, warmup_epochs=0.0, optimizer='sgd',
    nesterov=False, momentum=0.9, weight_decay_params='all',
    label_smoothing=0.0, ema_decay=0.0, checkpoint_every_steps=2000,
    **TEMPERATURE_ANNEALING)
ODCONV_RESNET_RECIPE = dict(
    ODCONV_COMMON, num_epochs=100.0, learning_rate=0.1, lr_schedule='step',
    lr_decay_rate=0.1, lr_milestone_epochs=(30, 60, 90), weight_decay=1e-4)
ODCONV_MOBILENET_RECIPE = dict(
    ODCONV_COMMON, num_epochs=150.0, learning_rate=0.05,
    lr_schedule='cosine', weight_decay=4e-5)
# Dynamic Convolution's recipes as its paper states them (Sec. 4, quoted by
# secondary sources [P]; no official code): MobileNetV2 300 epochs, 0.05
# with cosine decay, weight decay 4e-5, dropout 0.2; ResNet-18 100 epochs,
# 0.1 divided by 10 at epochs 30/60/90, weight decay 1e-4, dropout 0.1;
# batch 256, SGD momentum 0.9, the temperature annealed 30 -> 1 over the
# first 10 epochs. Not stated, taken from ODConv (which builds on DyConv's
# reimplementation): decay on every parameter, no label smoothing or EMA.
DYCONV_MOBILENET_RECIPE = dict(ODCONV_MOBILENET_RECIPE, num_epochs=300.0,
                               dropout_rate=0.2)
DYCONV_RESNET_RECIPE = dict(ODCONV_RESNET_RECIPE, dropout_rate=0.1)


def dynamic_recipe(model: str, num_experts: int, recipe: dict, **overrides):
  return _config(model, num_experts, {**recipe, **overrides})
