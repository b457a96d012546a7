"""Learning-rate schedules and optimizers, built from a config.

Durations come in epochs and are converted to steps here, once; the learning
rate in the config is per 256 examples and scaled by the global batch here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

SCHEDULES = ('exponential', 'cosine', 'constant')
OPTIMIZERS = ('rmsprop', 'sgd', 'adam')


def peak_learning_rate(config) -> float:
  return config.learning_rate * config.batch_size / 256


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int):
  """Linear warm-up from 0, then exponential (staircase), cosine or constant."""
  if config.lr_schedule not in SCHEDULES:
    raise ValueError(f'config.lr_schedule must be one of {SCHEDULES}, got '
                     f'{config.lr_schedule!r}.')
  peak = peak_learning_rate(config)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.lr_schedule == 'exponential':
    # TF EfficientNet: x lr_decay_rate every lr_decay_epochs, staircase.
    decay = optax.exponential_decay(
        peak, transition_steps=max(1, int(config.lr_decay_epochs *
                                          steps_per_epoch)),
        decay_rate=config.lr_decay_rate, staircase=True)
  elif config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(1, total_steps - warmup))
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """Weight decay on conv/dense kernels only: not on BN scales or biases
  (CondConv's expert biases are 2-D, so the rule is by name, not by rank)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: path[-1] == 'kernel' for path in flat})


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f'config.optimizer must be one of {OPTIMIZERS}, got '
                     f'{config.optimizer!r}.')
  if config.optimizer == 'rmsprop':
    # TensorFlow's RMSProp: eps inside the sqrt, mean square starting at 1,
    # momentum on the lr-scaled step.
    optimizer = optax.rmsprop(schedule, decay=config.rmsprop_decay,
                              eps=config.rmsprop_epsilon, initial_scale=1.0,
                              eps_in_sqrt=True, momentum=config.momentum)
  elif config.optimizer == 'sgd':
    optimizer = optax.sgd(schedule, momentum=config.momentum,
                          nesterov=config.nesterov)
  else:
    optimizer = optax.adam(schedule)
  # The gradient of weight_decay * 0.5 * sum(w^2) (TF's l2_loss), added before
  # the optimizer as in the official recipes.
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, decay_mask),
      optimizer)


def ema_update(ema, new, step, decay: float):
  """EMA with TF's warm-up: the decay is min(decay, (1 + t) / (10 + t))."""
  t = jnp.asarray(step, jnp.float32)
  rate = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, new)
