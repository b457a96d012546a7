"""The MobileNetV1 SSD: pinned sizes and cost, feature maps against the
anchors, the backbone against the classifier, CondConv against static."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from condconv_jax.detection import TF_COCO_LOSS
from condconv_jax.models import __main__ as models_cli
from condconv_jax.models import cost, get_model
from condconv_jax.models.ssd import BoxPredictor, SSDMobileNetV1
from tests.test_detection_matcher import gt_batch

SSD300 = (1, 300, 300, 3)
# A tiny detector for arithmetic on 2 CPU cores.
TINY = dict(width=0.25, num_classes=4)
TINY_IMAGE = (2, 64, 64, 3)
# Every kind of CondConv (depthwise, pointwise, extra 1x1 and 3x3 stride 2,
# predictors) beside static layers, at half the compile time of layers 7-13.
TINY_CONDCONV = dict(TINY, num_experts=2, condconv_layers=(13,))


def test_ssd300_parameters_by_hand():
  c = cost.count(get_model('ssd_mobilenet_v1'), SSD300)
  backbone = 4_231_976 - 1_025_000  # MobileNetV1 minus its 1024x1000 fc
  extra_convs = (1024 * 256 + 9 * 256 * 512 + 512 * 128 + 9 * 128 * 256 +
                 256 * 128 + 9 * 128 * 256 + 256 * 64 + 9 * 64 * 128)
  extra_bn = 2 * (256 + 512 + 128 + 256 + 128 + 256 + 64 + 128)
  outputs = [3 * 95] + [6 * 95] * 5  # anchors x (4 box codes + 91 classes)
  depths = [512, 1024, 512, 256, 256, 128]
  predictors = sum(d * o + o for d, o in zip(depths, outputs))
  assert c.params == backbone + extra_convs + extra_bn + predictors
  assert c.params == 6_819_839  # docs/paper.md: ~6.8M with a 91-way head


# (num_experts) -> (params, MADDs) of SSD300: docs/detection.md's table
# (`python -m condconv_jax.models --detector`).
PINNED_SSD300 = {0: (6_819_839, 1_237_129_408),
                 8: (52_636_687, 1_292_517_568)}


@pytest.mark.parametrize('num_experts', sorted(PINNED_SSD300))
def test_ssd300_cost_pins(num_experts):
  c = cost.count(get_model('ssd_mobilenet_v1', num_experts=num_experts),
                 SSD300)
  assert (c.params, c.macs) == PINNED_SSD300[num_experts]


def test_detector_cost_tables(capsys):
  # The CLI's rows are cost.count's figures: pinned above at 300x300, here
  # the static row and the default placement at a cheap size.
  models_cli.detector_tables(64, 2)
  out = capsys.readouterr().out
  static = cost.count(get_model('ssd_mobilenet_v1'), (1, 64, 64, 3))
  default = cost.count(get_model('ssd_mobilenet_v1', num_experts=2),
                       (1, 64, 64, 3))
  assert f'| MobileNetV1 1.0 SSD64 | {static.params:,} |' in out
  assert f'| CC-MobileNetV1 1.0 SSD64 (2) | {default.params:,} |' in out
  placements = [line for line in out.splitlines()
                if line.startswith('| backbone') or line.startswith('| extra')
                or line.startswith('| box')]
  assert len(placements) == len(models_cli.PLACEMENTS)


def shapes_of(model, image_shape):
  def init():
    return model.init_with_output(jax.random.key(0), jnp.zeros(image_shape),
                                  mutable=True)
  return jax.eval_shape(init)


@pytest.mark.parametrize('image_size', [300, (320, 256), 97])
def test_feature_maps_and_anchors_agree_on_any_input_size(image_size):
  model = get_model('ssd_mobilenet_v1')
  hw = (image_size,) * 2 if isinstance(image_size, int) else image_size
  outputs, variables = shapes_of(model, (1, *hw, 3))
  (maps,) = variables['intermediates']['feature_maps']
  assert [m.shape[1:3] for m in maps] == list(model.feature_map_sizes(hw))
  # TF's layer depths: 512 (layer 11), 1024 (layer 13), 512, 256, 256, 128.
  assert [m.shape[3] for m in maps] == [512, 1024, 512, 256, 256, 128]
  num_anchors = len(model.anchors(hw))
  assert outputs['box_offsets'].shape == (1, num_anchors, 4)
  assert outputs['class_logits'].shape == (1, num_anchors, 91)
  if image_size == 300:
    assert num_anchors == 1917


def test_narrow_extra_layers_keep_tf_min_depth():
  _, variables = shapes_of(get_model('ssd_mobilenet_v1', width=0.25),
                           (1, 64, 64, 3))
  params = variables['params']
  # max(int(depth x 0.25), 16): 1x1 to 64, 32, 32, 16; 3x3 to 128, 64,
  # 64, 32 (feature_map_generators.get_depth_fn).
  assert [params[f'extra{i}_1x1']['kernel'].shape[-1] for i in range(1, 5)] \
      == [64, 32, 32, 16]
  assert [params[f'extra{i}_3x3']['kernel'].shape[-1] for i in range(1, 5)] \
      == [128, 64, 64, 32]
  assert params['backbone']['conv_stem']['kernel'].shape[-1] == 16


@pytest.mark.parametrize('num_experts', [0, 8])
def test_backbone_parameters_are_the_classifiers(num_experts):
  ssd = shapes_of(get_model('ssd_mobilenet_v1', num_experts=num_experts),
                  (1, 64, 64, 3))[1]
  cls = shapes_of(get_model('mobilenet_v1', num_experts=num_experts),
                  (1, 64, 64, 3))[1]
  for collection in ('params', 'batch_stats'):
    ours = traverse_util.flatten_dict(ssd[collection]['backbone'])
    theirs = traverse_util.flatten_dict(cls[collection])
    theirs = {k: v for k, v in theirs.items() if k[0] != 'classifier'}
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in theirs.items()}


def test_feature_layers_are_the_classifiers_intermediate_activations():
  model = get_model('mobilenet_v1', width=0.25, num_classes=7)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = fake_variables(model, x)

  @jax.jit
  def inputs_of_layers_12_and_classifier(variables, x):
    seen = {}

    def record(next_fun, args, kwargs, context):
      if context.module.name in ('sep12_dw', 'classifier'):
        seen[context.module.name] = args[0]  # outputs of layers 11 and 13
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply(variables, x)
    return seen

  seen = inputs_of_layers_12_and_classifier(variables, x)
  features = jax.jit(model.clone(feature_layers=(11, 13)).apply)(
      {'params': {k: v for k, v in variables['params'].items()
                  if k != 'classifier'},
       'batch_stats': variables['batch_stats']}, x)
  np.testing.assert_allclose(features[11], seen['sep12_dw'], rtol=1e-6)
  np.testing.assert_allclose(features[13], seen['classifier'], rtol=1e-6)


def test_condconv_placement_flags():
  def experts(**kwargs):
    params = shapes_of(get_model('ssd_mobilenet_v1', num_experts=3, **kwargs),
                       (1, 64, 64, 3))[1]['params']
    return {name: params['backbone'][name]['kernel'].ndim == 5
            for name in ('sep6_pw', 'sep7_dw', 'sep13_pw')} | {
                'extra': params['extra1_3x3']['kernel'].ndim == 5,
                'predictor': params['box_predictor_0']['class'][
                    'kernel'].ndim == 5}
  assert experts() == dict(sep6_pw=False, sep7_dw=True, sep13_pw=True,
                           extra=True, predictor=True)
  assert experts(condconv_layers=(13,), condconv_extra=False,
                 condconv_predictors=False) == dict(
                     sep6_pw=False, sep7_dw=False, sep13_pw=True, extra=False,
                     predictor=False)


def fake_variables(model, images, seed=0):
  """Random variables of the model's shapes. `model.init` compiles for
  10-15 s on the 2-core CPU (parameter RNG); the tests need values, not
  the initializers."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('var', 'scale'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ('mean', 'bias') or name.endswith('_bias'):
      return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    fan_in = np.prod(leaf.shape[-4:-1]) if leaf.ndim >= 4 else leaf.shape[0]
    return rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_batch(seed=0):
  rng = np.random.default_rng(seed)
  boxes, labels, mask = gt_batch(rng, batch=TINY_IMAGE[0], max_boxes=4)
  mask[-1, 0] = True  # both images have objects
  boxes[-1, 0] = [0.2, 0.2, 0.7, 0.8]
  images = rng.normal(size=TINY_IMAGE).astype(np.float32)
  return images, boxes, labels % (TINY['num_classes'] - 1) + 1, mask


def test_forward_train_jit_and_grad():
  model = get_model('ssd_mobilenet_v1', **TINY_CONDCONV)
  images, boxes, labels, mask = tiny_batch()
  anchors = model.anchors(TINY_IMAGE[1:3])
  variables = fake_variables(model, images)

  @jax.jit
  def step(params, batch_stats):
    def loss_fn(params):
      outputs, state = model.apply(
          {'params': params, 'batch_stats': batch_stats}, images, train=True,
          mutable=['batch_stats'])
      loss, metrics = TF_COCO_LOSS(outputs, anchors, boxes, labels, mask)
      return loss, (metrics, state['batch_stats'])
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (metrics, new_stats)), grads = step(variables['params'],
                                             variables['batch_stats'])
  assert np.isfinite(loss) and float(metrics['positives_per_image']) > 0
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(float(np.abs(g).sum()) for g in leaves) > 0
  before = jax.tree.leaves(variables['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in
             zip(before, jax.tree.leaves(new_stats)))


def test_condconv_with_one_expert_and_unit_routing_is_the_static_model():
  images = tiny_batch()[0]
  static = get_model('ssd_mobilenet_v1', **TINY)
  cond = get_model('ssd_mobilenet_v1', num_experts=1, **TINY)
  variables = fake_variables(static, images)
  stats = variables['batch_stats']
  static_params = traverse_util.flatten_dict(variables['params'])
  cond_shapes = traverse_util.flatten_dict(
      jax.eval_shape(cond.init, jax.random.key(0), images)['params'])
  cond_params = {}
  for path, leaf in cond_shapes.items():
    if 'routing' in path:  # sigmoid(40) == 1.0 in float32
      value = (jnp.zeros(leaf.shape) if path[-1] == 'kernel'
               else jnp.full(leaf.shape, 40.0))
    else:
      value = static_params[path].reshape(leaf.shape)  # kernel -> [1, ...]
    cond_params[path] = value
  assert set(static_params) <= set(cond_params)
  expected = jax.jit(static.apply)(variables, images)
  ours = jax.jit(cond.apply)(
      {'params': traverse_util.unflatten_dict(cond_params),
       'batch_stats': stats}, images)
  for key in expected:
    np.testing.assert_allclose(ours[key], expected[key], rtol=1e-4,
                               atol=1e-4)


def test_eval_outputs_and_bf16_compute():
  images = tiny_batch()[0]
  model = get_model('ssd_mobilenet_v1', **TINY_CONDCONV)
  variables = fake_variables(model, images)
  expected = jax.jit(model.apply)(variables, images)
  num_anchors = len(model.anchors(TINY_IMAGE[1:3]))
  assert expected['class_logits'].shape == (2, num_anchors, 4)
  assert expected['box_offsets'].shape == (2, num_anchors, 4)
  ours = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, images)
  for key in expected:
    assert ours[key].dtype == jnp.float32
    error = np.linalg.norm(ours[key] - expected[key])
    assert error <= 0.05 * np.linalg.norm(expected[key])


def test_class_bias_init_and_static_predictor_bias():
  params = shapes_of(get_model('ssd_mobilenet_v1', num_experts=4, **TINY),
                     (1, 64, 64, 3))[1]['params']
  assert params['box_predictor_0']['class_bias'].shape == (3 * 4,)
  assert 'bias' not in params['box_predictor_0']['class']
  convs, _ = get_model('ssd_mobilenet_v1', num_experts=4).factories()
  predictor = BoxPredictor(6, 4, convs, conditional=True,
                           class_bias_init=-4.6)
  params = predictor.init(jax.random.key(0), jnp.zeros((1, 3, 3, 8)),
                          train=False)['params']
  np.testing.assert_array_equal(params['class_bias'],
                                np.full(6 * 4, -4.6, np.float32))
  np.testing.assert_array_equal(params['box_bias'], np.zeros(6 * 4))
  # TF's truncated normal: stddev 0.03 before truncation at 2 stddev.
  kernel = np.asarray(params['class']['kernel'])
  assert kernel.shape == (4, 1, 1, 8, 24) and np.abs(kernel).max() <= 0.06


def test_registry_defaults_and_errors():
  assert get_model('ssd_mobilenet_v1').num_classes == 91
  assert get_model('mobilenet_v1').num_classes == 1000
  assert isinstance(get_model('ssd_mobilenet_v1', num_classes=2),
                    SSDMobileNetV1)
  with pytest.raises(ValueError, match='fixed depth'):
    get_model('ssd_mobilenet_v1', depth=1.2)
  with pytest.raises(ValueError, match='background'):
    get_model('ssd_mobilenet_v1', num_classes=1).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match='batch, height, width'):
    get_model('ssd_mobilenet_v1').init(jax.random.key(0),
                                       jnp.zeros((64, 64, 3)))
  with pytest.raises(ValueError, match='feature_layers'):
    get_model('ssd_mobilenet_v1', source_layers=(11, 14)).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize('module', ['condconv_jax.detection',
                                    'condconv_jax.models.ssd'])
def test_either_package_imports_first(module):
  # condconv_jax.models registers the detector, which uses the anchors.
  subprocess.run([sys.executable, '-c', f'import {module}'], check=True)
