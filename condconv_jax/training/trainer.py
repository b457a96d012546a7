"""train_and_evaluate: the one training loop, for a laptop, a GPU box or a pod.

Data parallel: the global batch is sharded over a 1-D device mesh ('data')
spanning every device of every process, the state is replicated, and the
step is one jax.jit; XLA inserts the gradient all-reduce, and BatchNorm's
batch statistics are means over the global batch. Multi-host is the same code
after jax.distributed.initialize() (train.py does that when asked).

What is learned (loss, metrics, evaluation) comes from a task
(`tasks.py`); the loop does not fork on it.

A run resumes from its workdir by itself and continues exactly: the state
(including the step and RNG) comes from the checkpoint, and batch k, dropout
masks and the EMA depend only on k. The workdir may be any path etils.epath
handles (local, gs://); on several processes it must be shared.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from condconv_jax import config_schema, convert, data, paths
from condconv_jax.choices import check_choice
from condconv_jax.detection import losses
from condconv_jax.models import cost, get_model
from condconv_jax.training import checkpoint, optim, tasks
from condconv_jax.training.metrics_log import MetricsLog
from condconv_jax.training.preemption import PreemptionWatch
from condconv_jax.training.workdir import check_shared
from condconv_jax.upcycling import upcycle

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Model fields a config may set; None in the config keeps the model default.
MODEL_FIELDS = ('dropout_rate', 'drop_path_rate', 'bn_momentum', 'bn_epsilon',
                'activation', 'padding', 'strategy', 'routing_dropout',
                'conv_family', 'init_style')


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
  check_choice('config.dtype', config.dtype, tuple(DTYPES))
  kwargs = {name: config[name] for name in MODEL_FIELDS
            if config[name] is not None}
  kwargs.update(config.model_kwargs.to_dict())
  return get_model(config.model, num_experts=config.num_experts,
                   width=config.width, depth=config.depth,
                   num_classes=num_classes, dtype=DTYPES[config.dtype],
                   **kwargs)


def _temperature_kwargs(temperature) -> dict:
  """The model's call argument for a temperature (None: no schedule)."""
  return {} if temperature is None else {'temperature': temperature}


def train_step(state: TrainState, batch, *, model, tx, task, normalize,
               ema_decay: float, temperature=None):
  """temperature: step -> DyConv/ODConv softmax temperature, or None."""
  rng = jax.random.fold_in(state.rng, state.step)
  images = normalize(batch['image'])
  call_kwargs = _temperature_kwargs(
      None if temperature is None else temperature(state.step))

  def loss_fn(params):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'], rngs={'dropout': rng},
        **call_kwargs)
    loss, metrics = task.loss(outputs, batch)
    return loss, (metrics, updates['batch_stats'])

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if ema_decay > 0:
    ema_params = optim.ema_update(ema_params, params, state.step, ema_decay)
    ema_batch_stats = optim.ema_update(ema_batch_stats, batch_stats,
                                       state.step, ema_decay)
  metrics = {'loss': loss, **metrics,
             'grad_norm': optax.tree.norm(grads),
             'param_norm': optax.tree.norm(params)}
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state,
                            ema_params=ema_params,
                            ema_batch_stats=ema_batch_stats)
  return new_state, metrics


def eval_step(variables, batch, *, model, task, normalize, temperature=None):
  outputs = model.apply(variables, normalize(batch['image']), train=False,
                        **_temperature_kwargs(temperature))
  return task.eval_outputs(outputs, batch)


def has_dynamic_convs(model) -> bool:
  """Whether the model has DyConv/ODConv convs (a temperature to anneal)."""
  return (getattr(model, 'conv_family', 'condconv') in ('dyconv', 'odconv')
          and getattr(model, 'num_experts', 0) > 0)


POSTPROCESS_FIELDS = ('score_threshold', 'iou_threshold', 'max_detections',
                      'score_converter', 'scale_factors')


def make_task(config, dataset, model):
  """The dataset's task: detection (SSD loss and COCO metrics; the anchors
  of the model at the dataset's image size) or classification."""
  task = check_choice(f'{type(dataset).__name__}.task',
                      getattr(dataset, 'task', None),
                      ('classification', 'detection'))
  if task == 'detection':
    presets = {'tf_coco': losses.TF_COCO_LOSS,
               'tf_tpu_focal': losses.TF_TPU_FOCAL_LOSS}
    loss = presets[check_choice('config.detection_loss',
                                config.detection_loss, tuple(presets))]
    try:
      loss = dataclasses.replace(loss, **config.loss_kwargs.to_dict())
    except TypeError as error:
      raise ValueError(f'config.loss_kwargs: {error}; the fields are those of '
                       f'condconv_jax.detection.SSDLoss.') from None
    kwargs = config.postprocess_kwargs.to_dict()
    unknown = sorted(set(kwargs) - set(POSTPROCESS_FIELDS))
    if unknown:
      raise ValueError(f'config.postprocess_kwargs: unknown {unknown}; the '
                       f'fields are {POSTPROCESS_FIELDS} (condconv_jax.'
                       'detection.postprocess).')
    return tasks.Detection(model.anchors(dataset.image_shape[:2]), loss,
                           postprocess_kwargs=kwargs,
                           score_threshold=config.score_threshold)
  return tasks.Classification(dataset.num_classes, config.label_smoothing)


def train_steps(config, num_train: int) -> int:
  """The run's length: config.num_train_steps, or its epochs in steps.

  The TF recipes count epochs in fractional steps (examples / batch) and
  the run as int(epochs * examples / batch) (EfficientNet's train_steps);
  rounding first keeps a recipe given in steps (COCO's 200k) from losing
  one to float error.
  """
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(round(config.num_epochs * num_train / config.batch_size, 6))


class Trainer:
  """Holds what a run needs: mesh, model, dataset, task, jitted steps."""

  def __init__(self, config, dataset=None):
    self.config = config
    self.dataset = dataset or data.make_dataset(config)
    self.num_classes = self.dataset.num_classes
    self.model = build_model(config, self.num_classes)
    self.task = make_task(config, self.dataset, self.model)
    self.eval_split = config.eval_split or None  # None: the dataset's own
    self.normalize = self.dataset.normalization
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
    self.total_steps = train_steps(config, self.dataset.num_train)
    self.schedule = optim.learning_rate_schedule(
        config, self.dataset.num_train / config.batch_size, self.total_steps)
    self.temperature = optim.temperature_schedule(
        config, self.dataset.num_train / config.batch_size)
    if self.temperature is not None and not has_dynamic_convs(self.model):
      raise ValueError(
          f'config.temperature_* anneal the softmax of DyConv/ODConv convs, '
          f'and {config.model} (num_experts={config.num_experts}, '
          f'conv_family={getattr(self.model, "conv_family", None)}) has '
          f'none: use a dy_*/od_* model or conv_family dyconv/odconv with '
          f'num_experts > 0, or leave temperature_initial = '
          f'temperature_final = 1.')
    # Evaluation at the final temperature (the official ODConv evaluates
    # at T = 1; its validation during the annealing used the current T).
    self.eval_temperature = (None if self.temperature is None
                             else config.temperature_final)
    self.cost = cost.count(self.model, self.image_shape())
    abstract = self.abstract_variables()
    self.tx = optim.make_optimizer(
        config, self.schedule,
        optim.decay_mask(abstract['params'], abstract.get('batch_stats', {}),
                         config.weight_decay_params,
                         [layer.path for layer in self.cost.layers
                          if layer.depthwise]))
    self.train_step = jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx,
                          task=self.task, normalize=self.normalize,
                          ema_decay=config.ema_decay,
                          temperature=self.temperature),
        in_shardings=(self.replicated, self.data_sharding),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.model, task=self.task,
                          normalize=self.normalize,
                          temperature=self.eval_temperature),
        in_shardings=(self.replicated, self.data_sharding),
        out_shardings=self.replicated)

  def image_shape(self):
    return (1, *self.dataset.image_shape)

  def _init_variables(self, rng):
    params_rng, dropout_rng = jax.random.split(rng)
    return self.model.init({'params': params_rng, 'dropout': dropout_rng},
                           jnp.zeros(self.image_shape()), train=False)

  def abstract_variables(self):
    """The model's variables as ShapeDtypeStructs (no arithmetic)."""
    return jax.eval_shape(self._init_variables, jax.random.key(0))

  def init_state(self) -> TrainState:
    def init(seed):
      variables_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
      variables = self._init_variables(variables_rng)
      params = variables['params']
      batch_stats = variables.get('batch_stats', {})
      use_ema = self.config.ema_decay > 0
      return TrainState(
          step=jnp.zeros((), jnp.int32), params=params,
          batch_stats=batch_stats, opt_state=self.tx.init(params),
          ema_params=params if use_ema else {},
          ema_batch_stats=batch_stats if use_ema else {}, rng=state_rng)
    return jax.jit(init, static_argnums=0,
                   out_shardings=self.replicated)(self.config.seed)

  def upcycled_state(self, state: TrainState, source) -> TrainState:
    """`state` with its variables upcycled from a static run's workdir or
    converted weights at `source` (config.init_from): the same function
    as the static model at step 0; the optimizer and the EMA start anew."""
    static = _host_tree(load_static_variables(source, self.dataset,
                                              self.config))
    variables = upcycle(static, self.model, input_shape=self.image_shape(),
                        key=jax.random.key(self.config.seed))
    # Separate buffers for the EMA: the train step donates the state.
    params, ema_params = (_replicated(variables['params'], self.replicated)
                          for _ in range(2))
    batch_stats, ema_batch_stats = (
        _replicated(variables.get('batch_stats', {}), self.replicated)
        for _ in range(2))
    use_ema = self.config.ema_decay > 0
    return state.replace(
        params=params, batch_stats=batch_stats,
        opt_state=jax.jit(self.tx.init, out_shardings=self.replicated)(params),
        ema_params=ema_params if use_ema else {},
        ema_batch_stats=ema_batch_stats if use_ema else {})

  def abstract_state(self):
    return self.replicated_like(jax.eval_shape(self.init_state))

  def replicated_like(self, tree):
    """ShapeDtypeStructs of `tree`, replicated over the mesh (restore
    targets: every process gets the whole state)."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                       sharding=self.replicated), tree)

  def to_global(self, batch):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding,
                                                         x), batch)

  def model_inputs(self, batch):
    """A global batch's images as the model sees them (normalized)."""
    return self.normalize(batch['image'])

  def eval_variables(self, state: TrainState) -> dict:
    """The variables evaluation uses: the EMA's when the run keeps one."""
    return state.eval_variables(self.config.ema_decay > 0)

  def evaluate(self, variables, split: str | None = None) -> dict:
    """The task's metrics over every example of an evaluation split
    (default: config.eval_split, else the dataset's evaluation split)."""
    return self.evaluated(variables, split).result()

  def evaluated(self, variables, split: str | None = None):
    """The task's evaluator after every example of a split: its result()
    gives the metrics (detectors: it also keeps what pictures need)."""
    evaluator = self.task.evaluator()
    for batch in self.dataset.eval_batches(split or self.eval_split):
      evaluator.add(jax.device_get(self.eval_step(variables,
                                                  self.to_global(batch))))
    return evaluator


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


def train_and_evaluate(config, workdir, *, dataset=None,
                       step_hooks: Sequence[Callable[[int], None]] = ()):
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates.

  workdir: a local path or any URI etils.epath handles (gs://bucket/run).
  Returns (state, summary) where summary has the final evaluation metrics,
  params, MADDs and whether the run was preempted. step_hooks are called
  with each finished step (tests use them to simulate preemption).
  """
  if config.init_from and not config.num_experts:
    raise ValueError('config.init_from upcycles a static run into a '
                     'CondConv model: set config.num_experts > 0 (and '
                     'config.compare_num_experts=() for a single run).')
  workdir = paths.as_path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  check_shared(workdir)
  trainer = Trainer(config, dataset)
  if config.init_from and has_dynamic_convs(trainer.model):
    raise ValueError(f'config.init_from upcycles a static run into CondConv '
                     f'experts; {config.model} has DyConv/ODConv attentions '
                     f'with no static counterpart to start from.')
  model_cost = trainer.cost
  mngr = checkpoint.manager(workdir, config)
  try:
    if mngr.latest_step() is not None:
      state = checkpoint.restore(mngr, trainer.abstract_state())
    else:
      state = trainer.init_state()
      if config.init_from:
        state = trainer.upcycled_state(state, config.init_from)
  except:
    mngr.close()
    raise
  if jax.process_index() == 0:  # after the restore: a failed one changes nothing
    paths.write_text(workdir / 'config.json', config.to_json_best_effort(
        indent=2, sort_keys=True))
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
    with PreemptionWatch() as preemption:
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
          if trainer.temperature is not None:
            summary['temperature'] = float(trainer.temperature(step))
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
          log.message(f'step {done}: eval ' + ', '.join(
              f'{k} {v:.4g}' for k, v in eval_metrics.items()))
        stop = preemption.should_stop(done)
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
    paths.write_json(workdir / 'summary.json', summary)
  return state, summary


# Config fields on which a static run and its CondConv twin must agree for
# the twin to compute the static model's function at step 0.
TWIN_FIELDS = ('model', 'width', 'depth', 'padding', 'bn_epsilon',
               'activation', 'dataset', 'image_size', 'normalization')


def load_static_variables(source, dataset=None, config=None) -> dict:
  """The evaluation variables of a static run's latest checkpoint (read
  with `dataset`, default its own; checked against `config`'s
  TWIN_FIELDS), or converted weights."""
  path = paths.as_path(source)
  if (path / 'variables').exists():  # python -m condconv_jax.convert
    return convert.load_variables(path)
  if not (path / 'config.json').exists():
    raise FileNotFoundError(
        f'config.init_from={source}: neither a training workdir (no '
        'config.json) nor converted weights (no variables/ folder).')
  static_config = config_schema.load_config(path)
  if static_config.num_experts:
    raise ValueError(f'config.init_from={source} is a CondConv run '
                     f'({static_config.num_experts} experts): upcycling '
                     'starts from a static one.')
  if config is not None:
    differ = [f'{name} ({static_config[name]!r} there, {config[name]!r} here)'
              for name in TWIN_FIELDS if static_config[name] != config[name]]
    if differ:
      raise ValueError(f'config.init_from={source} is not this model\'s '
                       f'static twin: {"; ".join(differ)}.')
  return restore_for_eval(static_config, path, dataset=dataset)[1]


def _host_tree(tree):
  """A replicated tree as host numpy arrays (every process has them)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _replicated(tree, sharding):
  """Host arrays (the same on every process) as global arrays, each on
  buffers of its own (a CPU device may alias a host array's memory)."""
  return jax.tree.map(
      lambda a: jax.make_array_from_callback(
          a.shape, sharding, lambda index: np.array(a[index])), tree)


def restore_for_eval(config, workdir, step: int | None = None,
                     dataset=None):
  """(trainer, variables) from a workdir's checkpoint, for evaluation and
  analysis: the EMA variables when the run keeps an EMA."""
  trainer = Trainer(config, dataset)
  mngr = checkpoint.manager(paths.as_path(workdir), config,
                            read_only=True)
  try:
    state = checkpoint.restore(mngr, trainer.abstract_state(), step)
  finally:
    mngr.close()
  return trainer, trainer.eval_variables(state)

