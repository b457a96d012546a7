"""The training recipe, pinned against independent re-implementations of the
official TensorFlow rules: the learning-rate schedule, TF's RMSProp, the
EMA, the weight-decay mask, label smoothing and the batch scaling of the
learning rate."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from condconv_jax.models import cost
from condconv_jax.models import get_model
from condconv_jax.training import optim, trainer
from condconv_jax.config_schema import get_base_config
from tests import tiny

IMAGENET_TRAIN = 1_281_167


def recipe(**overrides):
  c = get_base_config()
  c.update(overrides)
  return c


def tf_build_learning_rate(step, initial_lr, steps_per_epoch, decay_type,
                           decay_factor, decay_epochs, total_steps,
                           warmup_epochs):
  """A transcription of the official TF EfficientNet utils.build_learning_rate
  (the cosine branch is the ResNet recipe's: decay after warm-up)."""
  if decay_type == 'exponential':
    decay_steps = steps_per_epoch * decay_epochs
    lr = initial_lr * decay_factor ** math.floor(step / decay_steps)
  elif decay_type == 'cosine':
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    t = min(max(step - warmup_steps, 0) / (total_steps - warmup_steps), 1.0)
    lr = 0.5 * initial_lr * (1 + math.cos(math.pi * t))
  else:
    lr = initial_lr
  warmup_steps = int(warmup_epochs * steps_per_epoch)
  if warmup_epochs and step < warmup_steps:
    lr = initial_lr * step / warmup_steps
  return lr


@pytest.mark.parametrize('schedule', ['exponential', 'cosine', 'constant'])
def test_schedule_follows_the_tf_formula(schedule):
  batch = 2048
  c = recipe(batch_size=batch, learning_rate=0.016, lr_schedule=schedule,
             warmup_epochs=5.0, lr_decay_rate=0.97, lr_decay_epochs=2.4)
  steps_per_epoch = IMAGENET_TRAIN / batch
  total = int(350 * steps_per_epoch)
  fn = optim.learning_rate_schedule(c, steps_per_epoch, total)
  peak = 0.016 * batch / 256
  warmup = int(5 * steps_per_epoch)  # 3127
  steps = [0, 1, 1000, warmup - 1, warmup, warmup + 1, 4000, 4504, 4505,
           50_000, 123_456, total - 1]
  for step in steps:
    want = tf_build_learning_rate(step, peak, steps_per_epoch, schedule, 0.97,
                                  2.4, total, 5.0)
    np.testing.assert_allclose(float(fn(step)), want, rtol=1e-5, atol=1e-9,
                               err_msg=f'step {step}')
  if schedule == 'exponential':
    # Decay counts from step 0: the first step after warm-up is already two
    # decays in (3128 / 1501.4), not the peak.
    assert float(fn(warmup)) == pytest.approx(peak * 0.97 ** 2, rel=1e-6)


def test_learning_rate_scales_with_the_global_batch():
  for batch in (256, 1024, 4096):
    c = recipe(batch_size=batch, learning_rate=0.016, lr_schedule='constant',
               warmup_epochs=0.0)
    fn = optim.learning_rate_schedule(c, 100.0, 1000)
    assert float(fn(10)) == pytest.approx(0.016 * batch / 256, rel=1e-6)


def _toy_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3)).astype(np.float32)
  y = rng.normal(size=(5, 2)).astype(np.float32)
  params = {'dense': {'kernel': rng.normal(size=(3, 2)).astype(np.float32),
                      'bias': rng.normal(size=(2,)).astype(np.float32)},
            'bn': {'scale': rng.normal(size=(2,)).astype(np.float32)}}
  batch_stats = {'bn': {'mean': np.zeros(2, np.float32)}}

  def grads(p):
    """Analytic gradient of sum((x W + b - y)^2) + sum(s^2)."""
    residual = x @ p['dense']['kernel'] + p['dense']['bias'] - y
    return {'dense': {'kernel': 2 * x.T @ residual,
                      'bias': 2 * residual.sum(0)},
            'bn': {'scale': 2 * p['bn']['scale']}}

  return params, batch_stats, grads


def test_rmsprop_matches_tensorflows_update_rule():
  """TF's RMSPropOptimizer (ms starting at 1, eps inside the sqrt, momentum
  on the lr-scaled step), with the l2 gradient added on non-BN parameters
  and the learning rate of each step from the warm-up schedule."""
  c = recipe(optimizer='rmsprop', rmsprop_decay=0.9, momentum=0.9,
             rmsprop_epsilon=1e-3, weight_decay=0.05, batch_size=256,
             learning_rate=0.1, lr_schedule='constant', warmup_epochs=2.0)
  schedule = optim.learning_rate_schedule(c, 2.0, 100)  # 4 warm-up steps
  params, batch_stats, grads = _toy_problem()
  mask = optim.decay_mask(params, batch_stats, 'all_but_batchnorm')
  tx = optim.make_optimizer(c, schedule, mask)
  ours = jax.tree.map(np.asarray, params)
  opt_state = tx.init(ours)
  ref = {k: np.array(v, np.float64) for k, v in
         traverse_util.flatten_dict(params, sep='/').items()}
  ms = {k: np.ones_like(v) for k, v in ref.items()}
  mom = {k: np.zeros_like(v) for k, v in ref.items()}
  for step in range(7):
    g = grads(ours)
    updates, opt_state = tx.update(g, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
    lr = 0.1 * min(step / 4, 1.0)
    g_ref = traverse_util.flatten_dict(
        grads(traverse_util.unflatten_dict(ref, sep='/')), sep='/')
    for k in ref:
      grad = g_ref[k] + (0.05 * ref[k] if not k.startswith('bn/') else 0)
      ms[k] = 0.9 * ms[k] + 0.1 * grad ** 2
      mom[k] = 0.9 * mom[k] + lr * grad / np.sqrt(ms[k] + 1e-3)
      ref[k] = ref[k] - mom[k]
  for k, value in traverse_util.flatten_dict(ours, sep='/').items():
    np.testing.assert_allclose(value, ref[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


def _bn_param_count(variables):
  """Each BatchNorm has a scale and a bias per running mean entry."""
  stats = traverse_util.flatten_dict(variables['batch_stats'])
  return 2 * sum(v.size for path, v in stats.items() if path[-1] == 'mean')


def _decayed_count(variables, rule):
  mask = traverse_util.flatten_dict(
      optim.decay_mask(variables['params'], variables['batch_stats'], rule))
  params = traverse_util.flatten_dict(variables['params'])
  return sum(params[p].size for p, on in mask.items() if on)


def test_weight_decay_mask_contents():
  variables = jax.eval_shape(
      get_model('efficientnet_b0', num_experts=4).init, jax.random.key(0),
      np.zeros((1, 32, 32, 3), np.float32))
  total = 13_314_116  # timm tf_efficientnet_cc_b0_4e
  bn = _bn_param_count(variables)
  # TF: every trainable variable but BatchNorm's (kernels, SE and
  # classifier biases, routing).
  assert _decayed_count(variables, 'all_but_batchnorm') == total - bn
  # Kernels only: minus the biases of the 16 SE blocks' two 1x1 convs
  # (reduce to in/4, expand back), the 8 routing functions and the
  # classifier.
  se_biases = 0
  routing_biases = 0
  params = variables['params']
  for name, block in params.items():
    if 'se' in block:
      se_biases += (block['se']['conv_reduce']['bias'].size +
                    block['se']['conv_expand']['bias'].size)
    if 'routing' in block:
      routing_biases += 4
  assert routing_biases == 8 * 4
  assert _decayed_count(variables, 'kernels') == (
      total - bn - se_biases - routing_biases - 1000)
  with pytest.raises(ValueError, match="'all_but_batchnorm', 'kernels'"):
    optim.decay_mask(params, variables['batch_stats'], 'everything')


def test_kernels_but_depthwise_leaves_out_every_depthwise_kernel():
  model = get_model('efficientnet_b0', num_experts=4)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             np.zeros((1, 32, 32, 3), np.float32))
  # Depthwise by shape alone: one input channel per group and a k x k
  # window (HWIO [k, k, 1, C], CondConv experts [E, k, k, 1, C]); the 16
  # MBConv blocks have one each.
  kernels = {path: v for path, v in traverse_util.flatten_dict(
      variables['params']).items() if path[-1] == 'kernel'}
  depthwise = [v.size for v in kernels.values()
               if v.ndim >= 4 and v.shape[-2] == 1 and v.shape[-3] > 1]
  assert len(depthwise) == 16
  layers = cost.count(model, (1, 32, 32, 3)).layers
  mask = traverse_util.flatten_dict(optim.decay_mask(
      variables['params'], variables['batch_stats'], 'kernels_but_depthwise',
      [layer.path for layer in layers if layer.depthwise]))
  decayed = sum(kernels[p].size for p, on in mask.items() if on)
  assert decayed == sum(v.size for v in kernels.values()) - sum(depthwise)


@pytest.fixture(scope='module')
def three_steps():
  """A tiny run's first 3 steps (EMA decay 0.5: the warm-up term binds
  until t = 8; label smoothing 0.2): the trainer, the host copies of the
  state before and after each step, and each step's metrics."""
  cfg = tiny.config(ema_decay=0.5, label_smoothing=0.2)
  run = trainer.Trainer(cfg, tiny.dataset(cfg))
  state = run.init_state()
  batches = run.dataset.train_batches(0)
  history, metrics = [jax.device_get(state)], []
  for _ in range(3):
    state, m = run.train_step(state, run.to_global(next(batches)))
    history.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return run, history, metrics


def test_ema_of_params_and_batch_statistics_follows_tf(three_steps):
  """ema_{t+1} = r_t ema_t + (1 - r_t) new_{t+1}, r_t = min(decay,
  (1 + t) / (10 + t)), for the parameters AND the new running statistics."""
  _, history, _ = three_steps
  for collection, ema_collection in (('params', 'ema_params'),
                                     ('batch_stats', 'ema_batch_stats')):
    expected = traverse_util.flatten_dict(getattr(history[0], collection))
    for t in range(3):
      rate = min(0.5, (1 + t) / (10 + t))
      new = traverse_util.flatten_dict(getattr(history[t + 1], collection))
      expected = {k: rate * expected[k] + (1 - rate) * new[k] for k in new}
      got = traverse_util.flatten_dict(getattr(history[t + 1],
                                               ema_collection))
      for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5,
                                   atol=1e-7, err_msg=f'{collection} {k}')


def test_training_loss_is_label_smoothed_cross_entropy(three_steps):
  run, history, metrics = three_steps
  batch = next(run.dataset.train_batches(0))
  images = (batch['image'].astype(np.float32) / 255 - 0.5) / 0.3
  state = history[0]
  logits, _ = run.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=True, mutable=['batch_stats'],
      rngs={'dropout': jax.random.fold_in(state.rng, 0)})
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  k = tiny.NUM_CLASSES
  targets = np.full_like(logits, 0.2 / k)
  targets[np.arange(len(logits)), batch['label']] += 0.8
  want = -(targets * log_probs).sum(1).mean()
  assert float(metrics[0]['loss']) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('field,value,valid', [
    ('optimizer', 'adamw', "'rmsprop', 'sgd', 'adam'"),
    ('lr_schedule', 'linear', "'exponential', 'cosine', 'constant', 'step'"),
    ('dtype', 'float16', "'float32', 'bfloat16'"),
    ('weight_decay_params', 'everything',
     "'all_but_batchnorm', 'kernels', 'kernels_but_depthwise', 'all'"),
    ('activation', 'gelu', "'relu', 'relu6', 'swish', 'silu'"),
    ('conv_family', 'condconv2', "'condconv', 'dyconv', 'odconv'"),
    ('padding', 'same', "'SAME', 'symmetric'"),
    ('strategy', 'fast',
     "'auto', 'vmap', 'experts', 'direct', 'loop', 'fused'"),
])
def test_unknown_string_options_name_the_valid_ones(field, value, valid):
  cfg = tiny.config(**{field: value}, num_experts=0)
  with pytest.raises(ValueError, match=f'{field} must be one of {valid}; '
                     f'got {value!r}'):
    trainer.Trainer(cfg, tiny.dataset(cfg))


def odconv_get_temperature(iteration, epoch, iter_per_epoch, temp_epoch=10,
                           temp_init=30.0):
  """A transcription of the official ODConv utils/misc.py get_temperature."""
  total_temp_iter = iter_per_epoch * temp_epoch
  current_iter = iteration + epoch * iter_per_epoch
  return 1.0 + max(0, (temp_init - 1.0) * (
      (total_temp_iter - current_iter) / total_temp_iter))


def test_temperature_schedule_is_odconvs_get_temperature():
  """Step s trains at get_temperature(i + 1) for its batch i of its epoch:
  main.py sets it before each batch's forward."""
  steps_per_epoch = IMAGENET_TRAIN / 256
  schedule = optim.temperature_schedule(
      recipe(temperature_initial=30.0, temperature_final=1.0,
             temperature_epochs=10.0), steps_per_epoch)
  iters = math.ceil(steps_per_epoch)
  for step in (0, 1, 2500, 25_000, 10 * iters - 1, 10 * iters, 60_000):
    epoch, iteration = divmod(step, iters)
    want = odconv_get_temperature(iteration + 1, epoch, iters)
    # The official count uses whole batches per epoch; ours the float
    # examples / batch, as every schedule here: they differ by < 1e-3.
    assert float(schedule(step)) == pytest.approx(want, abs=2e-3), step
  assert float(schedule(0)) == pytest.approx(30.0 - 29.0 / (10 * iters),
                                             rel=1e-6)
  assert float(schedule(10 ** 7)) == 1.0


def test_no_temperature_schedule_by_default_and_bad_values_named():
  assert optim.temperature_schedule(get_base_config(), 100.0) is None
  with pytest.raises(ValueError, match='temperature_initial must be > 0'):
    optim.temperature_schedule(recipe(temperature_initial=0.0), 100.0)
  with pytest.raises(ValueError, match='temperature_epochs must be >= 0'):
    optim.temperature_schedule(recipe(temperature_initial=2.0,
                                      temperature_epochs=-1.0), 100.0)


def test_step_schedule_is_pytorchs_multistep_per_epoch():
  """lr = 0.1 * 0.1 ** (milestones reached), stepped per epoch (ODConv's
  adjust_learning_rate with --lr-decay schedule --schedule 30 60 90)."""
  config = recipe(lr_schedule='step', learning_rate=0.1, batch_size=256,
                  lr_decay_rate=0.1, lr_milestone_epochs=(30, 60, 90),
                  warmup_epochs=0.0)
  steps_per_epoch = IMAGENET_TRAIN / 256
  schedule = optim.learning_rate_schedule(config, steps_per_epoch,
                                          int(100 * steps_per_epoch))
  for epoch, want in ((0, 0.1), (29.9, 0.1), (30, 0.01), (59.5, 0.01),
                      (60, 1e-3), (90, 1e-4), (99.9, 1e-4)):
    step = math.ceil(epoch * steps_per_epoch)
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5), epoch
  with pytest.raises(ValueError, match='lr_milestone_epochs'):
    optim.learning_rate_schedule(recipe(lr_schedule='step'), 10.0, 100)


def test_weight_decay_all_reaches_every_parameter():
  """PyTorch's SGD(model.parameters(), weight_decay=wd): BatchNorm scales
  and biases and the attentions' parameters too (official ODConv)."""
  model = get_model('od_resnet18', num_experts=4, num_classes=10)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             np.zeros((1, 32, 32, 3), np.float32))
  mask = optim.decay_mask(variables['params'], variables['batch_stats'],
                          'all')
  assert all(traverse_util.flatten_dict(mask).values())
