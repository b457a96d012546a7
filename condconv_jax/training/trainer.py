"""train_and_evaluate: the one training loop, for a laptop, a GPU box or a pod.

Data parallel: the global batch is sharded over a 1-D device mesh ('data')
spanning every device of every process, the state is replicated, and the
step is one jax.jit; XLA inserts the gradient all-reduce, and BatchNorm's
batch statistics are means over the global batch. Multi-host is the same code
after jax.distributed.initialize() (train.py does that when asked).

A run resumes from its workdir by itself and continues exactly: the state
(including the step and RNG) comes from the checkpoint, and batch k, dropout
masks and the EMA depend only on k.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from condconv_jax import cost
from condconv_jax.models import get_model
from condconv_jax.training import checkpoint, data, optim
from condconv_jax.training.metrics_log import MetricsLog

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Model fields a config may set; None in the config keeps the model default.
MODEL_FIELDS = ('dropout_rate', 'drop_path_rate', 'bn_momentum', 'bn_epsilon',
                'activation', 'padding', 'strategy', 'routing_dropout')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  rng: jax.Array

  def eval_variables(self, use_ema: bool):
    if use_ema:
      return {'params': self.ema_params, 'batch_stats': self.ema_batch_stats}
    return {'params': self.params, 'batch_stats': self.batch_stats}


def build_model(config, num_classes: int):
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype must be one of {sorted(DTYPES)}, got '
                     f'{config.dtype!r}.')
  kwargs = {name: config[name] for name in MODEL_FIELDS
            if config[name] is not None}
  kwargs.update(config.model_kwargs.to_dict())
  return get_model(config.model, num_experts=config.num_experts,
                   width=config.width, depth=config.depth,
                   num_classes=num_classes, dtype=DTYPES[config.dtype],
                   **kwargs)


def cross_entropy(logits, labels, num_classes, smoothing=0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                smoothing) if smoothing else jax.nn.one_hot(
                                    labels, num_classes)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch, *, model, tx, config, num_classes):
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    loss = cross_entropy(logits, batch['label'], num_classes,
                         config.label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if config.ema_decay > 0:
    ema_params = optim.ema_update(ema_params, params, state.step,
                                  config.ema_decay)
    ema_batch_stats = optim.ema_update(ema_batch_stats, batch_stats,
                                       state.step, config.ema_decay)
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params),
  }
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state,
                            ema_params=ema_params,
                            ema_batch_stats=ema_batch_stats)
  return new_state, metrics


def eval_step(variables, batch, *, model, num_classes):
  logits = model.apply(variables, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  loss = cross_entropy(logits, batch['label'], num_classes)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


class Trainer:
  """Holds what a run needs: mesh, model, dataset, jitted steps."""

  def __init__(self, config, dataset=None):
    self.config = config
    self.dataset = dataset or data.make_dataset(config)
    self.num_classes = self.dataset.num_classes
    self.model = build_model(config, self.num_classes)
    # Auto axes: XLA propagates the batch sharding through the model (any
    # Flax model works unchanged); Explicit axes would type every op.
    self.mesh = jax.make_mesh((jax.device_count(),), ('data',),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.data_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    if config.batch_size % jax.device_count():
      raise ValueError(f'config.batch_size ({config.batch_size}) must be '
                       f'divisible by the number of devices '
                       f'({jax.device_count()}).')
    self.steps_per_epoch = self.dataset.steps_per_epoch
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                        else int(config.num_epochs * self.steps_per_epoch))
    self.schedule = optim.learning_rate_schedule(config, self.steps_per_epoch,
                                                 self.total_steps)
    self.tx = optim.make_optimizer(config, self.schedule)
    self.train_step = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx,
                          config=config, num_classes=self.num_classes),
        in_shardings=(self.replicated, self.data_sharding),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.model,
                          num_classes=self.num_classes),
        in_shardings=(self.replicated, self.data_sharding),
        out_shardings=self.replicated)

  def image_shape(self):
    return (1, *self.dataset.image_shape)

  def init_state(self) -> TrainState:
    def init(seed):
      rng = jax.random.PRNGKey(seed)
      params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
      variables = self.model.init(
          {'params': params_rng, 'dropout': dropout_rng},
          jnp.zeros(self.image_shape()), train=False)
      params, batch_stats = variables['params'], variables['batch_stats']
      use_ema = self.config.ema_decay > 0
      return TrainState(
          step=jnp.zeros((), jnp.int32), params=params,
          batch_stats=batch_stats, opt_state=self.tx.init(params),
          ema_params=params if use_ema else {},
          ema_batch_stats=batch_stats if use_ema else {}, rng=state_rng)
    return jax.jit(init, static_argnums=0,
                   out_shardings=self.replicated)(self.config.seed)

  def abstract_state(self):
    shapes = jax.eval_shape(self.init_state)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                       sharding=self.replicated), shapes)

  def to_global(self, batch):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding,
                                                         x), batch)

  def eval_variables(self, state: TrainState) -> dict:
    """The variables evaluation uses: the EMA's when the run keeps one."""
    return state.eval_variables(self.config.ema_decay > 0)

  def evaluate(self, variables) -> dict:
    """Accuracy and loss over every example of the evaluation split."""
    totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
    for batch in self.dataset.eval_batches():
      sums = jax.device_get(self.eval_step(variables, self.to_global(batch)))
      for k in totals:
        totals[k] += float(sums[k])
    count = max(totals['count'], 1.0)
    return {'accuracy': totals['correct'] / count,
            'loss': totals['loss'] / count, 'count': totals['count']}


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _prefetch_to_device(batches, size: int = 2):
  """Starts the host-to-device copy of the next `size` batches while the
  current step runs (device_put is asynchronous)."""
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


class _FiniteLossCheck:
  """Checks each step's loss exactly once. `add` checks the previous step,
  so the host never waits on the step it has just dispatched; `flush` checks
  the latest now (before an evaluation or a checkpoint)."""

  def __init__(self):
    self._pending = None

  def add(self, step: int, metrics):
    self.flush()
    self._pending = (step, metrics)

  def flush(self):
    if self._pending is not None:
      _check_finite(*self._pending)
      self._pending = None


def _check_finite(step: int, metrics):
  loss = float(jax.device_get(metrics['loss']))
  if not np.isfinite(loss):
    raise FloatingPointError(
        f'non-finite loss ({loss}) at step {step}. Checkpoints written so far '
        f'are kept; lower the learning rate or check the input data.')


def _mean_metrics(window: Sequence[dict]) -> dict:
  fetched = jax.device_get(list(window))
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def write_config(config, workdir: str):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str, *, dataset=None,
                       step_hooks: Sequence[Callable[[int], None]] = ()):
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates.

  Returns (state, summary) where summary has the final evaluation metrics,
  params, MADDs and whether the run was preempted. step_hooks are called
  with each finished step (tests use them to simulate preemption).
  """
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, dataset)
  write_config(config, workdir)
  model_cost = cost.count(trainer.model, trainer.image_shape())
  mngr = checkpoint.manager(workdir, config)
  if mngr.latest_step() is not None:
    state = checkpoint.restore(mngr, trainer.abstract_state())
  else:
    state = trainer.init_state()
  start_step = int(state.step)
  log = MetricsLog(workdir, trainer.total_steps, start_step,
                   config.batch_size)
  log.message(f'{config.model} (experts={config.num_experts}): '
              f'{model_cost.params:,} params, {model_cost.macs / 1e6:.1f}M '
              f'MADDs; {jax.device_count()} devices, {jax.process_count()} '
              f'processes; steps {start_step} -> {trainer.total_steps} '
              f'({trainer.steps_per_epoch}/epoch)')
  train_iter = _prefetch_to_device(
      map(trainer.to_global, trainer.dataset.train_batches(start_step)))
  preempted, window, eval_metrics = False, [], None
  loss_check = _FiniteLossCheck()
  try:
    with _Preemption() as preemption:
      for step in range(start_step, trainer.total_steps):
        state, metrics = trainer.train_step(state, next(train_iter))
        loss_check.add(step, metrics)
        window.append(metrics)
        done = step + 1
        for hook in step_hooks:
          hook(done)
        last = done == trainer.total_steps
        if done % config.log_every_steps == 0 or last:
          summary = _mean_metrics(window)
          summary['learning_rate'] = float(trainer.schedule(step))
          summary['images_per_second'] = log.progress_to(
              done, {'loss': summary['loss']})
          log.write(done, 'train', summary)
          window = []
        epoch_end = done % trainer.steps_per_epoch == 0
        if last or (epoch_end and config.eval_every_epochs > 0 and
                    (done // trainer.steps_per_epoch) %
                    config.eval_every_epochs == 0):
          loss_check.flush()
          eval_metrics = trainer.evaluate(trainer.eval_variables(state))
          log.write(done, 'eval', eval_metrics)
          log.message(f'step {done}: eval accuracy '
                      f'{eval_metrics["accuracy"]:.4f} over '
                      f'{int(eval_metrics["count"])} examples')
        # Multi-host: every process must stop at the same step, which JAX's
        # preemption sync (behind reached_preemption) agrees on.
        stop = (mngr.reached_preemption(done) if jax.process_count() > 1
                else preemption.requested)
        if last or stop or done % config.checkpoint_every_steps == 0:
          loss_check.flush()
          checkpoint.save(mngr, done, state, force=last or stop)
        if stop:
          log.message(f'preempted: saved step {done}; rerun the same '
                      f'command to resume.')
          preempted = True
          break
      loss_check.flush()
  finally:
    mngr.wait_until_finished()
    mngr.close()
    log.close()
  if eval_metrics is None and not preempted:
    eval_metrics = trainer.evaluate(  # the run had already finished
        trainer.eval_variables(state))
  summary = {'params': model_cost.params, 'macs': model_cost.macs,
             'preempted': preempted, 'step': int(state.step),
             **({f'eval_{k}': v for k, v in eval_metrics.items()}
                if eval_metrics else {})}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return state, summary


def load_config(workdir: str):
  """The resolved config a run wrote to its workdir, as a locked ConfigDict."""
  from configs import base  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: pass --config, or point '
                            f'--workdir at a training workdir.')
  with open(path) as f:
    saved = json.load(f)
  config = base.get_base_config()
  with config.unlocked():
    config.model_kwargs = saved.pop('model_kwargs', {})
  saved['compare_num_experts'] = tuple(saved.get('compare_num_experts', ()))
  config.update(saved)
  return config


def restore_for_eval(config, workdir: str, step: int | None = None,
                     dataset=None):
  """(trainer, variables) from a workdir's checkpoint, for evaluation and
  analysis: the EMA variables when the run keeps an EMA."""
  trainer = Trainer(config, dataset)
  mngr = checkpoint.manager(workdir, config, read_only=True)
  try:
    state = checkpoint.restore(mngr, trainer.abstract_state(), step)
  finally:
    mngr.close()
  return trainer, trainer.eval_variables(state)
