"""The "auto" rule and per-conv-kind strategy specs (strategy.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condconv_jax import ops, strategy
from condconv_jax.geometry import conv_geometry


def _geom(size, kernel, groups=1, batch=8, strides=1):
  return conv_geometry((batch, size, size, 8),
                       (kernel, kernel, 8 // groups, 8), strides=strides,
                       feature_group_count=groups)


def test_auto_rule():
  def auto(size, kernel, groups=1, backend='cpu', batch=8, strides=1):
    return strategy.choose(_geom(size, kernel, groups, batch, strides), batch,
                           8, backend)
  # A classifier (1x1 output) takes the experts form on every backend.
  for backend in ('cpu', 'gpu', 'tpu'):
    assert auto(1, 1, backend=backend) == 'experts'
  assert auto(2, 1, strides=2) == 'experts'  # strided down to 1x1
  assert auto(7, 1) == auto(7, 1, backend='gpu') == 'direct'
  assert auto(1, 1, groups=2) == 'direct'  # grouped 1x1: no experts form
  assert auto(7, 3, groups=8) == auto(7, 3, groups=8, backend='gpu') == 'direct'
  assert auto(7, 3) == auto(7, 3, batch=1) == 'loop'
  assert auto(7, 3, groups=2) == 'loop'  # grouped k x k: like any k x k
  assert auto(7, 3, groups=2, backend='gpu') == 'direct'
  assert auto(7, 3, backend='gpu') == 'direct'
  assert auto(7, 3, backend='gpu', batch=1) == 'vmap'


def test_conv_kinds():
  assert strategy.conv_kind(_geom(1, 1)) == 'classifier'
  assert strategy.conv_kind(_geom(7, 1)) == 'pointwise'
  assert strategy.conv_kind(_geom(7, 3, groups=8)) == 'depthwise'
  assert strategy.conv_kind(_geom(7, 1, groups=8)) == 'depthwise'
  assert strategy.conv_kind(_geom(7, 3, groups=2)) == 'grouped'
  assert strategy.conv_kind(_geom(7, 1, groups=2)) == 'grouped'
  assert strategy.conv_kind(_geom(7, 3)) == 'kxk'


def test_strategy_spec_overrides_per_kind():
  resolve = lambda spec, geom, backend='cpu': strategy.resolve(
      spec, geom, 8, 8, backend)
  # Named kinds take their strategy, the others the default ('auto' = choose).
  spec = 'depthwise=vmap'
  assert resolve(spec, _geom(7, 3, groups=8)) == 'vmap'
  assert resolve(spec, _geom(7, 1)) == 'direct'
  assert resolve(spec, _geom(7, 3)) == 'loop'
  assert resolve(spec, _geom(7, 3), backend='gpu') == 'direct'
  assert resolve(spec, _geom(1, 1)) == 'experts'
  spec = 'direct, kxk = loop'
  assert resolve(spec, _geom(7, 3), backend='gpu') == 'loop'
  assert resolve(spec, _geom(1, 1)) == 'direct'
  assert resolve('vmap', _geom(7, 1)) == 'vmap'
  assert strategy.parse('auto') == ('auto', {})
  assert strategy.parse('experts,classifier=auto,grouped=direct') == (
      'experts', {'classifier': 'auto', 'grouped': 'direct'})


@pytest.mark.parametrize('spec, message', [
    ('fastest', "must be one of 'auto', .*; got 'fastest'. A strategy can "
     'also be named per conv kind'),
    ('depthwise=fast', "got 'fast' in 'depthwise=fast'"),
    ('kxk=', "got '' in 'kxk='"),
    ('kxk=a=vmap', "got 'a=vmap'"),
    ('dw=vmap', "unknown conv kind 'dw'"),
    ('=vmap', "unknown conv kind ''"),
    ('kxk=vmap,direct', 'must come first'),
    ('kxk=vmap,kxk=loop', "names 'kxk' twice"),
    ('', 'empty item'),
    ('direct,', 'empty item'),
    (None, 'must be a string'),
])
def test_bad_strategy_specs_say_what_is_wrong(spec, message):
  with pytest.raises(ValueError, match=message):
    strategy.parse(spec)


def test_strategy_spec_reaches_the_conv():
  # The override must change which computation runs, and only for its kind:
  # the traced program equals the one of the strategy it names.
  rng = np.random.default_rng(0)
  def program(spec, groups, kernel):
    x = jnp.asarray(rng.standard_normal((3, 6, 6, 4)), jnp.float32)
    experts = jnp.ones((2, kernel, kernel, 4 // groups, 4))
    weights = jnp.ones((3, 2))
    return str(jax.make_jaxpr(lambda x: ops.conditional_conv(
        x, experts, weights, feature_group_count=groups, strategy=spec))(x))
  assert program('depthwise=vmap', 4, 3) == program('vmap', 4, 3)
  assert program('depthwise=vmap', 4, 3) != program('direct', 4, 3)
  assert program('depthwise=vmap', 1, 1) == program('direct', 1, 1)
  assert program('direct,kxk=vmap', 1, 3) == program('vmap', 1, 3)
