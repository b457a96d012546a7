"""Every registered model: pinned sizes, the paper's costs, forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax.models import cost
from condconv_jax.models import MODELS, get_model
from condconv_jax.models.paper import PAPER_COSTS

IMAGE = (1, 224, 224, 3)

# Parameter counts of every registered model, static and with 8 experts.
# Where a peer publishes the count, it is theirs (source in the comment);
# the rest pin the architecture against accidental change.
PINNED_PARAMS = {
    ('mobilenet_v1', 0): 4_231_976,  # MobileNet paper: 4.2M
    ('mobilenet_v1', 8): 31_923_960,
    ('mobilenet_v1_mini', 0): 182_920,  # by hand: 6 separable layers + fc
    ('mobilenet_v1_mini', 8): 1_399_000,  # by hand: layers 4-6 + fc x 8
    ('mobilenet_v2', 0): 3_504_872,  # torchvision mobilenet_v2
    ('mobilenet_v2', 8): 27_559_320,  # CondConv paper: 27.5M [U]
    ('mnasnet_a1', 0): 3_887_038,  # timm mnasnet_a1 / semnasnet_100
    ('mnasnet_a1', 8): 16_167_030,
    ('efficientnet_b0', 0): 5_288_548,  # timm efficientnet_b0
    ('efficientnet_b0', 8): 24_013_284,  # timm tf_efficientnet_cc_b0_8e
    ('resnet18', 0): 11_689_512,  # torchvision resnet18
    ('resnet18', 8): 70_426_192,
    ('resnet34', 0): 21_797_672,  # torchvision resnet34
    ('resnet34', 8): 113_572_704,
    ('resnet50', 0): 25_557_032,  # torchvision resnet50
    ('resnet50', 8): 130_226_296,
    ('resnet101', 0): 44_549_160,  # torchvision resnet101
    ('resnet101', 8): 149_218_424,
    ('resnet152', 0): 60_192_808,  # torchvision resnet152
    ('resnet152', 8): 164_862_072,
    # By hand in tests/test_ssd.py; docs/paper.md: ~6.8M (91 classes).
    ('ssd_mobilenet_v1', 0): 6_819_839,
    ('ssd_mobilenet_v1', 8): 52_636_687,
}

# Other named variants the paper uses.
PINNED_VARIANT_PARAMS = [
    ('efficientnet_b0', dict(num_experts=4), 13_314_116),  # timm cc_b0_4e
    ('efficientnet_b0', dict(num_experts=8, depth=1.1), 39_715_968),  # cc_b1_8e
    ('mobilenet_v1', dict(width=0.75), 2_585_560),
    ('mobilenet_v1', dict(width=0.5), 1_331_592),
    ('mobilenet_v1', dict(width=0.25), 470_072),
    ('mobilenet_v2', dict(width=0.5), 1_968_680),  # torchvision
]


def test_every_registered_model_has_pins():
  missing = [(name, e) for name in MODELS for e in (0, 8)
             if (name, e) not in PINNED_PARAMS]
  assert not missing, f'add parameter pins for {missing}'


@pytest.mark.parametrize('name,num_experts', sorted(PINNED_PARAMS))
def test_pinned_parameter_count(name, num_experts):
  model = get_model(name, num_experts=num_experts)
  assert cost.count(model, IMAGE).params == PINNED_PARAMS[name, num_experts]


@pytest.mark.parametrize('name,kwargs,params', PINNED_VARIANT_PARAMS)
def test_pinned_variant_parameter_count(name, kwargs, params):
  assert cost.count(get_model(name, **kwargs), IMAGE).params == params


# The acceptance bounds: (row label) -> relative tolerance on MADDs.
MACS_TOLERANCE = {
    'MobileNetV1 1.0': 0.01,
    'CC-MobileNetV1 1.0 (8)': 0.01,
    'MobileNetV2 1.0': 0.02,
    'CC-MobileNetV2 1.0 (8)': 0.05,
    'MnasNet-A1': 0.02,
    'CC-MnasNet-A1 (8)': 0.05,
    'ResNet-50': 0.01,
    'CC-ResNet-50 (8)': 0.01,
    'EfficientNet-B0': 0.01,
    'CC-EfficientNet-B0 (4)': 0.01,
    'CC-EfficientNet-B0 (8)': 0.01,
    'CC-EfficientNet-B0 d1.1 (8)': 0.01,
}
PAPER_ROWS = [row for row in PAPER_COSTS if row[0] in MACS_TOLERANCE]


@pytest.mark.parametrize('row', PAPER_ROWS, ids=[r[0] for r in PAPER_ROWS])
def test_madds_match_the_paper(row):
  label, name, kwargs, paper_params, paper_macs, _ = row
  c = cost.count(get_model(name, **kwargs), IMAGE)
  assert abs(c.macs - paper_macs) <= MACS_TOLERANCE[label] * paper_macs
  if paper_params is not None and paper_params > 1e7:
    assert c.params == paper_params or abs(c.params - paper_params) <= (
        0.01 * paper_params)
  elif paper_params is not None:
    assert abs(c.params - paper_params) <= 0.005 * paper_params + 5e3


# Detectors return per-anchor dicts, not [B, num_classes] logits;
# tests/test_ssd.py covers their forward, training and jit.
DETECTORS = {'ssd_mobilenet_v1'}
CLASSIFIERS = sorted(set(MODELS) - DETECTORS)


# The largest zoo models compile for 15-65 s each on 2 cores: `pytest -m
# slow` (their layers, blocks and counts are tested by default elsewhere:
# timm parity, peer counts, the smaller models here).
SLOW_MODELS = {'efficientnet_b0', 'mnasnet_a1', 'mobilenet_v2', 'resnet101',
               'resnet152'}


@pytest.mark.parametrize('num_experts,name', [
    pytest.param(experts, name, marks=pytest.mark.slow)
    if name in SLOW_MODELS else (experts, name)
    for experts in (0, 2) for name in CLASSIFIERS])
def test_forward_train_and_eval(name, num_experts):
  model = get_model(name, num_experts=num_experts, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  logits = model.apply(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  train_logits, state = model.apply(variables, x, train=True,
                                    mutable=['batch_stats'],
                                    rngs={'dropout': jax.random.key(2)})
  assert np.all(np.isfinite(train_logits))
  # Training mode updates the BatchNorm running statistics.
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(state['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_condconv_placement_follows_the_paper():
  # Shapes only: eval_shape traces the init without running it.
  params = jax.eval_shape(get_model('efficientnet_b0', num_experts=4).init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  # Stages 5-7 (blocks_4_* .. blocks_6_*) are CondConv with a shared routing
  # function; stage 4 and the head are static.
  assert params['blocks_4_0']['conv_pw']['kernel'].shape == (4, 1, 1, 80, 480)
  assert params['blocks_4_0']['routing']['dense']['kernel'].shape == (80, 4)
  assert 'routing' not in params['blocks_4_0']['conv_dw']
  assert params['blocks_3_2']['conv_pw']['kernel'].ndim == 4
  assert params['conv_head']['kernel'].ndim == 4
  v1 = jax.eval_shape(get_model('mobilenet_v1', num_experts=8).init,
                      jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  assert v1['sep6_pw']['kernel'].ndim == 4
  assert v1['sep7_pw']['kernel'].shape[0] == 8
  assert v1['classifier']['fc']['kernel'].shape == (8, 1, 1, 1024, 1000)


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='mobilenet_v3'), 'valid names: .*efficientnet_b0'),
    (dict(name='resnet50', bogus=1), r"unknown argument\(s\) \['bogus'\]"),
    (dict(name='resnet50', depth=1.1), 'fixed depth'),
    (dict(name='resnet50', num_experts=-1), 'num_experts'),
])
def test_registry_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    get_model(**kwargs)


def test_routing_dropout_reaches_every_routing_function():
  model = get_model('mobilenet_v1_mini', num_experts=4, num_classes=5,
                    routing_dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 1))
  variables = model.init(jax.random.key(1), x)
  _, state = model.apply(variables, x, train=True,
                         mutable=['batch_stats', 'intermediates'],
                         rngs={'dropout': jax.random.key(2)})
  inter = state['intermediates']
  for layer in (inter['sep4_dw'], inter['sep6_pw'], inter['classifier']['fc']):
    (weights,) = layer['routing']['routing_weights']
    assert np.any(np.asarray(weights) == 0), 'no routing dropout applied'


def test_strategy_spec_per_conv_kind_through_a_model():
  # A per-kind spec reaches the model's CondConv layers and computes the same
  # function; a misspelled one fails at init even for a static model.
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  out, programs = {}, {}
  for spec in ('auto', 'depthwise=vmap,pointwise=experts'):
    model = get_model('mobilenet_v1_mini', num_experts=3, num_classes=5,
                      strategy=spec)
    variables = model.init(jax.random.key(1), x)
    apply = lambda v: model.apply(v, x, train=False)  # pylint: disable=cell-var-from-loop
    out[spec], programs[spec] = apply(variables), str(
        jax.make_jaxpr(apply)(variables))
  assert programs['auto'] != programs['depthwise=vmap,pointwise=experts']
  np.testing.assert_allclose(out['auto'], out['depthwise=vmap,pointwise=experts'],
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="unknown conv kind 'dw'"):
    get_model('mobilenet_v1_mini', num_classes=5, strategy='dw=vmap').init(
        jax.random.key(1), x)
