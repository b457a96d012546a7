"""Sparse upcycling for CondConv: a static network's weights as the experts
of its CondConv twin, computing the same function at step 0.

With the routing kernel and bias at zero every routing weight is act(0) =
r0 (1/2 for the paper's sigmoid, 1/E for a softmax), and experts

    W_e = W / (E r0) + d_e,   sum_e d_e = 0

mix to sum_e r0 W_e = W exactly (to float rounding), while the zero-mean
noise d_e (`noise_scale` times the kernel's standard deviation) breaks the
experts' symmetry so that they can specialize (Komatsuzaki et al., 2022,
"Sparse Upcycling", made exact for CondConv's kernel mixing).

    cc_variables = upcycle(static_variables, get_model(name, num_experts=8),
                           input_shape=(1, 224, 224, 3))
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from condconv_jax import layer_math


def upcycled_experts(kernel: jax.Array, num_experts: int, key: jax.Array,
                     noise_scale: float = 0.01,
                     routing_weight: float = 0.5) -> jax.Array:
  """[E, *kernel.shape] experts that mix to `kernel` when every routing
  weight is `routing_weight`: kernel / (E r0) + d_e, with d_e zero-mean
  over the experts and of scale noise_scale * std(kernel)."""
  layer_math.check_num_experts(num_experts)
  kernel = jnp.asarray(kernel)
  noise = jax.random.normal(key, (num_experts, *kernel.shape), kernel.dtype)
  noise = noise - noise.mean(axis=0, keepdims=True)
  scale = noise_scale * jnp.std(kernel)
  return kernel[None] / (num_experts * routing_weight) + scale * noise


def _routing_weight_at_zero(model: nn.Module, variables, input_shape) -> float:
  """act(0) of the model's routing functions, read from the weights they
  sow with zero routing parameters (one value for the whole model)."""
  apply = jax.jit(functools.partial(model.apply, mutable=['intermediates']))
  _, state = apply(variables, jnp.zeros(input_shape))
  sown = [np.asarray(leaf) for path, leaf in
          traverse_util.flatten_dict(state.get('intermediates', {})).items()
          if 'routing_weights' in path]
  if not sown:
    raise ValueError(f'{type(model).__name__} has no CondConv routing '
                     'function: pass the CondConv twin (num_experts > 0).')
  values = np.unique(np.concatenate([w.ravel() for w in sown]))
  if np.ptp(values) > 1e-6:
    raise ValueError('the routing functions of the model give different '
                     f'weights at zero ({values.min():g} .. '
                     f'{values.max():g}): upcycle needs one routing '
                     'activation for all of them.')
  return float(values[0])


def upcycle(static_variables: dict, condconv_model: nn.Module, *,
            input_shape=(1, 224, 224, 3), key: jax.Array | None = None,
            noise_scale: float = 0.01) -> dict:
  """The CondConv twin's variables from its static twin's.

  Every parameter and BatchNorm statistic of the static model carries over
  by name: a conv kernel [kh, kw, Cin/g, Cout] (or a Dense kernel
  [Cin, Cout] under a 1x1 CondConv) becomes E upcycled experts, a bias [C]
  E copies scaled alike, anything else is copied; routing parameters (and
  the bias of a CondConv whose static conv has none) start at zero, so the
  twin computes the static model's function at step 0. Raises ValueError
  naming the parameter when the twins do not match.

  input_shape: an input the CondConv model accepts, NHWC (it is traced,
  not computed, except for one forward pass at batch 1 to read the
  routing activation).
  """
  key = jax.random.key(0) if key is None else key
  shape = (1, *tuple(input_shape)[1:])
  abstract = jax.eval_shape(
      lambda: condconv_model.init(jax.random.key(0), jnp.zeros(shape)))
  static_params = traverse_util.flatten_dict(static_variables['params'])
  targets = traverse_util.flatten_dict(abstract['params'])
  used = set()
  params = {}
  upcycled = []  # (path, static value) of the expert parameters
  for path, target in targets.items():
    name = '/'.join(path)
    if path in static_params:
      value = jnp.asarray(static_params[path])
      used.add(path)
      if value.shape == target.shape:
        params[path] = value.astype(target.dtype)
        continue
      num_experts = target.shape[0]
      if value.ndim == 2 and target.shape == (num_experts, 1, 1,
                                              *value.shape):
        value = value[None, None]  # a Dense kernel under a 1x1 CondConv
      if target.shape != (num_experts, *value.shape):
        raise ValueError(f'parameter {name}: the static model has shape '
                         f'{value.shape}, the CondConv twin {target.shape}; '
                         'they are not twins.')
      upcycled.append((path, value, target))
    elif 'routing' in path or (path[-1] == 'bias' and
                               path[:-1] + ('kernel',) in static_params):
      params[path] = jnp.zeros(target.shape, target.dtype)
    else:
      raise ValueError(f'parameter {name} of the CondConv twin has no '
                       'counterpart in the static variables.')
  unused = sorted('/'.join(p) for p in set(static_params) - used)
  if unused:
    raise ValueError(f'static parameters with no place in the CondConv '
                     f'twin: {", ".join(unused)}.')
  # Read r0 with the experts as plain copies (any values: only the
  # routing, at zero, is read).
  for path, value, target in upcycled:
    params[path] = jnp.broadcast_to(value, target.shape).astype(target.dtype)
  variables = dict(static_variables, params=traverse_util.unflatten_dict(
      params))
  _check_collections(static_variables, abstract)
  r0 = _routing_weight_at_zero(condconv_model, variables, shape)
  keys = jax.random.split(key, max(len(upcycled), 1))
  for k, (path, value, target) in zip(keys, upcycled):
    params[path] = upcycled_experts(value, target.shape[0], k, noise_scale,
                                    r0).astype(target.dtype)
  variables['params'] = traverse_util.unflatten_dict(params)
  return variables


def _check_collections(static_variables, abstract):
  """The non-parameter collections (BatchNorm statistics) must match."""
  for collection in set(abstract) - {'params', 'intermediates'}:
    want = traverse_util.flatten_dict(abstract[collection])
    have = traverse_util.flatten_dict(static_variables.get(collection, {}))
    if {p: v.shape for p, v in want.items()} != {
        p: np.shape(v) for p, v in have.items()}:
      missing = sorted('/'.join(p) for p in set(want) ^ set(have))
      example = ', '.join(missing[:5]) or 'their shapes'
      raise ValueError(f'{collection} of the static model and the CondConv '
                       f'twin differ (e.g. {example}).')
