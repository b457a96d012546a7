"""Learning-rate schedules, optimizers, the weight-decay mask and the EMA,
built from a config the way the official TensorFlow recipes define them.

Durations come in epochs and are converted to steps here, once; the learning
rate in the config is per 256 examples and scaled by the global batch here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from condconv_jax.choices import check_choice

SCHEDULES = ('exponential', 'cosine', 'constant', 'step')
OPTIMIZERS = ('rmsprop', 'sgd', 'adam')
# Which parameters weight decay reaches. 'all_but_batchnorm' is the official
# TF EfficientNet/MnasNet/CondConv rule (main.py adds weight_decay *
# l2_loss(v) for every trainable v whose name lacks 'batch_normalization':
# kernels, biases, routing); 'kernels' is the common rule for ResNets (the
# Flax ImageNet example decays only params with ndim > 1).
# 'kernels_but_depthwise' is TF-slim's MobileNetV1 default
# (mobilenet_v1_arg_scope(regularize_depthwise=False)); the TF Object
# Detection API's SSD turns it on there, so its recipes use 'kernels'.
# 'all' is PyTorch's SGD(weight_decay=...) over model.parameters(), the
# official ODConv recipe's.
WEIGHT_DECAY_PARAMS = ('all_but_batchnorm', 'kernels', 'kernels_but_depthwise',
                       'all')


def peak_learning_rate(config) -> float:
  return config.learning_rate * config.batch_size / 256


def learning_rate_schedule(config, steps_per_epoch: float, total_steps: int):
  """step -> learning rate, the official TF EfficientNet `build_learning_rate`.

  steps_per_epoch is a float (train examples / global batch), as in the TF
  code. 'exponential': peak * decay_rate ** floor(step / decay_steps) with
  decay_steps = lr_decay_epochs * steps_per_epoch, counted FROM STEP 0; the
  linear warm-up from warmup_start * peak (0 in the TF classification
  recipes; the TF detection API's cosine_decay_with_warmup starts at its
  warmup_learning_rate) to the peak overrides the first warmup_steps =
  int(warmup_epochs * steps_per_epoch) steps (it does not delay the decay). 'cosine': warm-up, then a half cosine from the peak to 0
  over the steps after warm-up (Goyal et al. / the Flax ImageNet example,
  the ResNet recipe's). 'constant': the peak after warm-up. 'step': peak *
  lr_decay_rate ** (how many of lr_milestone_epochs the current epoch has
  reached), PyTorch's MultiStepLR stepped per epoch (ResNet's 30/60/90).
  """
  check_choice('config.lr_schedule', config.lr_schedule, SCHEDULES)
  if config.lr_schedule == 'step' and not config.lr_milestone_epochs:
    raise ValueError("config.lr_schedule='step' needs "
                     'config.lr_milestone_epochs, e.g. (30, 60, 90).')
  peak = peak_learning_rate(config)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  decay_steps = max(config.lr_decay_epochs * steps_per_epoch, 1.0)
  cosine_steps = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if config.lr_schedule == 'exponential':
      lr = peak * config.lr_decay_rate ** jnp.floor(step / decay_steps)
    elif config.lr_schedule == 'cosine':
      progress = jnp.clip((step - warmup) / cosine_steps, 0.0, 1.0)
      lr = 0.5 * peak * (1.0 + jnp.cos(math.pi * progress))
    elif config.lr_schedule == 'step':
      epoch = jnp.floor(step / steps_per_epoch)
      reached = sum((epoch >= m).astype(jnp.float32)
                    for m in config.lr_milestone_epochs)
      lr = peak * config.lr_decay_rate ** reached
    else:
      lr = jnp.full_like(step, peak)
    if warmup > 0:
      start = config.warmup_start * peak
      lr = jnp.where(step < warmup, start + (peak - start) * step / warmup, lr)
    return lr

  return schedule


def temperature_schedule(config, steps_per_epoch: float):
  """step -> the softmax temperature of DyConv/ODConv attentions, or None
  when it stays 1 (no schedule).

  Linear from temperature_initial to temperature_final over
  temperature_epochs, then constant: DyConv's 30 -> 1 over the first 10
  epochs, as the official ODConv main.py does it: before batch i it sets
  T = get_temperature(i + 1) = 1 + (30 - 1) * (1 - (i + 1) / (10 * steps
  per epoch)), so step s trains at the schedule's value at s + 1.
  """
  start, end = config.temperature_initial, config.temperature_final
  for name, value in (('temperature_initial', start),
                      ('temperature_final', end)):
    if value <= 0:
      raise ValueError(f'config.{name} must be > 0, got {value}.')
  if config.temperature_epochs < 0:
    raise ValueError(f'config.temperature_epochs must be >= 0, got '
                     f'{config.temperature_epochs}.')
  if start == end == 1.0:
    return None
  anneal_steps = config.temperature_epochs * steps_per_epoch

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if anneal_steps <= 0:
      return jnp.full_like(step, end)
    progress = jnp.clip((step + 1) / anneal_steps, 0.0, 1.0)
    return start + (end - start) * progress

  return schedule


def decay_mask(params, batch_stats, rule: str, depthwise=()):
  """{param path: bool}: which parameters weight decay reaches.

  BatchNorm layers are recognized by owning running statistics in
  `batch_stats` (structure, not names), so the rule holds for any model;
  `depthwise` holds the '/'-joined paths of the depthwise convs
  (`cost.count(...).layers` marks them).
  """
  check_choice('config.weight_decay_params', rule, WEIGHT_DECAY_PARAMS)
  batchnorm_modules = {path[:-1] for path in
                       traverse_util.flatten_dict(batch_stats)}
  depthwise = set(depthwise)
  flat = traverse_util.flatten_dict(params)
  if rule == 'all':
    mask = {path: True for path in flat}
  elif rule == 'all_but_batchnorm':
    mask = {path: path[:-1] not in batchnorm_modules for path in flat}
  else:
    # CondConv's expert biases are 2-D, so the rule is by name, not by rank.
    mask = {path: path[-1] == 'kernel' and not (
        rule == 'kernels_but_depthwise' and '/'.join(path[:-1]) in depthwise)
            for path in flat}
  return traverse_util.unflatten_dict(mask)


def make_optimizer(config, schedule, mask) -> optax.GradientTransformation:
  """The config's optimizer, with weight decay (on `mask`) added first."""
  check_choice('config.optimizer', config.optimizer, OPTIMIZERS)
  if config.optimizer == 'rmsprop':
    # TensorFlow's RMSPropOptimizer: ms starts at 1, ms = rho ms + (1-rho) g^2,
    # mom = momentum mom + lr g / sqrt(ms + eps), w -= mom.
    optimizer = optax.rmsprop(schedule, decay=config.rmsprop_decay,
                              eps=config.rmsprop_epsilon, initial_scale=1.0,
                              eps_in_sqrt=True, momentum=config.momentum)
  elif config.optimizer == 'sgd':
    optimizer = optax.sgd(schedule, momentum=config.momentum,
                          nesterov=config.nesterov)
  else:
    optimizer = optax.adam(schedule)
  # The gradient of weight_decay * 0.5 * sum(w^2) (TF's l2_loss added to the
  # loss), added before the optimizer as in the official recipes.
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask),
                     optimizer)


def ema_update(ema, new, step, decay: float):
  """tf.train.ExponentialMovingAverage(decay, num_updates=step):
  ema = rate * ema + (1 - rate) * new, rate = min(decay, (1 + t) / (10 + t)),
  t the step being taken (0 for the first update)."""
  t = jnp.asarray(step, jnp.float32)
  rate = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, new)
