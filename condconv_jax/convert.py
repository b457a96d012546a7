"""Brings timm's EfficientNet(-CondConv) and timm's or torchvision's
ResNet-50 weights into our Flax models.

The only public ImageNet CondConv weights are the official TensorFlow
EfficientNet-CondConv checkpoints, which timm ports as
tf_efficientnet_cc_b0_4e / _b0_8e / _b1_8e. From such a PyTorch state_dict
(.pth, .bin or .safetensors) this produces our variables (params +
batch_stats) for `get_model('efficientnet_b0', ...)` with the settings the
weights need (TF 'SAME' padding and BN eps 1e-3 for the tf_* ports):

    variables = convert.from_timm(state_dict, 'tf_efficientnet_cc_b0_4e')
    model = convert.TIMM_MODELS['tf_efficientnet_cc_b0_4e'].model()
    logits = model.apply(variables, images)   # images normalized per .spec

CLI (writes an orbax checkpoint and the config that eval.py reads):

    python -m condconv_jax.convert --model tf_efficientnet_cc_b0_4e \
        --weights tf_efficientnet_cc_b0_4e.pth --out /tmp/cc_b0_4e
    python eval.py --checkpoint /tmp/cc_b0_4e --data_dir=$TFDS_DATA_DIR

Layouts: PyTorch conv weights [O, I/g, kh, kw] -> [kh, kw, I/g, O]; timm's
CondConv2d weights [E, O*(I/g)*kh*kw] (OIHW flattened) -> [E, kh, kw, I/g, O];
Linear [out, in] -> [in, out]; BatchNorm weight/bias -> scale/bias and
running_mean/var -> batch_stats mean/var.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from condconv_jax import paths
from condconv_jax.config_schema import get_base_config
from condconv_jax.models import get_model

# timm's BatchNorm bookkeeping counter has no counterpart and no effect.
IGNORED_SUFFIXES = ('num_batches_tracked',)


@dataclasses.dataclass(frozen=True)
class TimmSpec:
  """What a timm checkpoint needs from our model and input pipeline."""

  num_experts: int
  depth: float
  padding: str  # 'SAME' (TF ports) or 'symmetric' (timm's own)
  bn_epsilon: float
  normalization: str  # condconv_jax.data.imagenet.NORMALIZATIONS key
  image_size: int  # timm's evaluation size; crop = size / (size + 32)
  top1: float | None = None  # timm's reported ImageNet top-1
  architecture: str = 'efficientnet_b0'  # our get_model name

  def model_kwargs(self) -> dict:
    return dict(num_experts=self.num_experts, depth=self.depth,
                padding=self.padding, bn_epsilon=self.bn_epsilon)

  def model(self, **kwargs):
    return get_model(self.architecture, **{**self.model_kwargs(), **kwargs})


TIMM_MODELS = {
    'tf_efficientnet_cc_b0_4e': TimmSpec(4, 1.0, 'SAME', 1e-3, 'inception',
                                         224, 77.32),
    'tf_efficientnet_cc_b0_8e': TimmSpec(8, 1.0, 'SAME', 1e-3, 'inception',
                                         224, 77.96),
    'tf_efficientnet_cc_b1_8e': TimmSpec(8, 1.1, 'SAME', 1e-3, 'inception',
                                         240, 79.32),
    'efficientnet_cc_b0_4e': TimmSpec(4, 1.0, 'symmetric', 1e-5, 'imagenet',
                                      224),
    'efficientnet_cc_b0_8e': TimmSpec(8, 1.0, 'symmetric', 1e-5, 'imagenet',
                                      224),
    'efficientnet_cc_b1_8e': TimmSpec(8, 1.1, 'symmetric', 1e-5, 'imagenet',
                                      240),
    'tf_efficientnet_b0': TimmSpec(0, 1.0, 'SAME', 1e-3, 'imagenet', 224),
    'efficientnet_b0': TimmSpec(0, 1.0, 'symmetric', 1e-5, 'imagenet', 224),
    # torchvision's and timm's ResNet-50 share their state_dict names.
    'resnet50': TimmSpec(0, 1.0, 'symmetric', 1e-5, 'imagenet', 224,
                         architecture='resnet50'),
}

_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'),
              'running_var': ('batch_stats', 'var')}


def _spec(model_name: str) -> TimmSpec:
  if model_name not in TIMM_MODELS:
    raise ValueError(f'unknown timm model {model_name!r}; supported: '
                     f'{", ".join(sorted(TIMM_MODELS))}.')
  return TIMM_MODELS[model_name]


def _our_module_path(timm_module: list[str]) -> tuple[str, ...]:
  """['blocks', '4', '0', 'conv_pw'] -> ('blocks_4_0', 'conv_pw');
  ['layer2', '0', 'downsample', '1'] -> ('layer2_0', 'downsample_bn')."""
  if timm_module in (['classifier'], ['fc']):
    return ('classifier', 'fc')
  if timm_module[0] == 'blocks':
    head = (f'blocks_{timm_module[1]}_{timm_module[2]}',)
    rest = timm_module[3:]
  elif timm_module[0].startswith('layer') and len(timm_module) > 2:
    head = (f'{timm_module[0]}_{timm_module[1]}',)
    rest = timm_module[2:]
  else:
    head, rest = (), timm_module
  if rest[:1] == ['downsample']:  # Sequential(conv, bn)
    rest = ['downsample' if rest[1:] == ['0'] else 'downsample_bn']
  mapped = []
  for part in rest:
    mapped += {'routing_fn': ['routing', 'dense']}.get(part, [part])
  return head + tuple(mapped)


def _convert_kernel(value: np.ndarray, target_shape) -> np.ndarray:
  if len(target_shape) == 5:  # CondConv: [E, O*(I/g)*kh*kw], OIHW flattened
    e, kh, kw, cin_g, cout = target_shape
    return value.reshape(e, cout, cin_g, kh, kw).transpose(0, 3, 4, 2, 1)
  if len(target_shape) == 4:  # Conv: [O, I/g, kh, kw]
    return value.transpose(2, 3, 1, 0)
  return value.T  # Linear: [out, in]


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def from_timm(state_dict, model_name: str) -> dict:
  """timm state_dict -> {'params', 'batch_stats'} for TIMM_MODELS[model_name].

  Raises ValueError listing every state_dict key left unused, every parameter
  left unfilled, and every shape that does not match.
  """
  spec = _spec(model_name)
  model = spec.model()
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((1, spec.image_size, spec.image_size, 3))))
  targets = {collection: traverse_util.flatten_dict(abstract[collection])
             for collection in ('params', 'batch_stats')}
  filled = {'params': {}, 'batch_stats': {}}
  unused, mismatched = [], []
  for key, value in state_dict.items():
    if key.endswith(IGNORED_SUFFIXES):
      continue
    *module, leaf = key.split('.')
    path = _our_module_path(module)
    value = _to_numpy(value)
    if (path[-1].startswith('bn') or path[-1].endswith('_bn')) and (
        leaf in _BN_LEAVES):
      collection, name = _BN_LEAVES[leaf]
    elif leaf in ('weight', 'bias'):
      collection, name = 'params', 'kernel' if leaf == 'weight' else 'bias'
    else:
      unused.append(key)
      continue
    target = targets[collection].get(path + (name,))
    if target is None:
      unused.append(key)
      continue
    if name == 'kernel':
      if value.size != np.prod(target.shape):
        mismatched.append(f'{key} {value.shape} -> {"/".join(path)} '
                          f'{target.shape}')
        continue
      value = _convert_kernel(value, target.shape)
    if value.shape != target.shape:
      mismatched.append(f'{key} {value.shape} -> {"/".join(path)} '
                        f'{target.shape}')
      continue
    filled[collection][path + (name,)] = value
  unfilled = ['/'.join((c,) + p) for c, t in targets.items() for p in t
              if p not in filled[c]]
  problems = []
  if unused:
    problems.append(f'state_dict keys left unused: {unused}')
  if unfilled:
    problems.append(f'parameters left unfilled: {unfilled}')
  if mismatched:
    problems.append(f'shape mismatches: {mismatched}')
  if problems:
    raise ValueError(f'{model_name}: the state_dict does not match our '
                     f'model. ' + '; '.join(problems))
  return {c: traverse_util.unflatten_dict(v) for c, v in filled.items()}


def load_state_dict(path: str) -> dict:
  """A .safetensors, .pth or .bin state_dict as {name: array}."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found.')
  if path.endswith('.safetensors'):
    # Imported here, like orbax below: converting weights in Python
    # (`from_timm`) needs neither.
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    return safetensors.numpy.load_file(path)
  try:  # PyTorch is optional: only .pth/.bin files need it.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(f'reading {path} needs PyTorch (pip install torch), or '
                      f'convert it to .safetensors first.') from error
  state = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(state, dict) and 'state_dict' in state:
    state = state['state_dict']
  return state


def save_variables(variables: dict, out_dir, config=None):
  """An orbax checkpoint of the variables (+ config.json for eval.py), in a
  local folder or at a gs:// URI."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = paths.as_path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out_dir / 'variables',
                      jax.tree.map(jnp.asarray, variables), force=True)
  if config is not None:
    paths.write_text(out_dir / 'config.json',
                     config.to_json_best_effort(indent=2, sort_keys=True))


def load_variables(checkpoint_dir, target=None) -> dict:
  """Variables written by `save_variables` (or the CLI).

  target: optional pytree of jax.ShapeDtypeStruct with shardings (e.g.
  replicated over a mesh spanning every process, which eval.py passes) to
  restore into; without it the arrays land on the default device.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = paths.as_path(checkpoint_dir) / 'variables'
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: expected a folder written by '
                            f'`python -m condconv_jax.convert`.')
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


def eval_config(model_name: str):
  """The ImageNet evaluation config for converted weights."""
  spec = _spec(model_name)
  c = get_base_config()
  c.model = spec.architecture
  for key, value in spec.model_kwargs().items():
    c[key] = value
  c.normalization = spec.normalization
  c.image_size = spec.image_size
  c.ema_decay = 0.0  # the converted weights are already the EMA weights
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True, choices=sorted(TIMM_MODELS))
  parser.add_argument('--weights', required=True,
                      help='.pth, .bin or .safetensors state_dict')
  parser.add_argument('--out', required=True, help='output folder')
  args = parser.parse_args()
  variables = from_timm(load_state_dict(args.weights), args.model)
  save_variables(variables, args.out, eval_config(args.model))
  count = sum(np.prod(v.shape) for v in jax.tree.leaves(variables['params']))
  print(json.dumps({'model': args.model, 'params': int(count),
                    'out': args.out}))


if __name__ == '__main__':
  main()
