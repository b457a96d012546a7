"""Brings timm's EfficientNet(-CondConv), timm's or torchvision's ResNet-50
and the official ODConv checkpoints' weights into our Flax models.

The only public ImageNet CondConv weights are the official TensorFlow
EfficientNet-CondConv checkpoints, which timm ports as
tf_efficientnet_cc_b0_4e / _b0_8e / _b1_8e. From such a PyTorch state_dict
(.pth, .bin or .safetensors) this produces our variables (params +
batch_stats) for `get_model('efficientnet_b0', ...)` with the settings the
weights need (TF 'SAME' padding and BN eps 1e-3 for the tf_* ports):

    variables = convert.from_timm(state_dict, 'tf_efficientnet_cc_b0_4e')
    model = convert.TIMM_MODELS['tf_efficientnet_cc_b0_4e'].model()
    logits = model.apply(variables, images)   # images normalized per .spec

The official ODConv code (OSVAI/ODConv, Li, Zhou, Yao, ICLR 2022) saves
od_resnet18/50/101 and od_mobilenetv2_050/075/100 state_dicts; K (the
paper's "1x", "4x") is read from the weights:

    model, variables = convert.from_odconv(state_dict, 'od_resnet50')
    logits = model.apply(variables, images)   # ImageNet mean/std

CLI (writes an orbax checkpoint and the config that eval.py reads):

    python -m condconv_jax.convert --model tf_efficientnet_cc_b0_4e \
        --weights tf_efficientnet_cc_b0_4e.pth --out /tmp/cc_b0_4e
    python -m condconv_jax.convert --model od_resnet50 \
        --weights od_resnet50_4x.pth --out /tmp/od_resnet50_4x
    python eval.py --checkpoint /tmp/cc_b0_4e --data_dir=$TFDS_DATA_DIR

Layouts: PyTorch conv weights [O, I/g, kh, kw] -> [kh, kw, I/g, O]; timm's
CondConv2d weights [E, O*(I/g)*kh*kw] (OIHW flattened) -> [E, kh, kw, I/g, O];
ODConv2d weights [K, O, I/g, kh, kw] -> [K, kh, kw, I/g, O]; ODConv's
attention 1x1 convs [out, in, 1, 1] -> Dense [in, out]; Linear [out, in] ->
[in, out]; BatchNorm weight/bias -> scale/bias and
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
from condconv_jax.models.mbconv import stage_repeats
from condconv_jax.models.resnet import STAGE_SIZES

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


# --- The official ODConv code's checkpoints (OSVAI/ODConv) ------------------

ODCONV_ARCHS = ('od_resnet18', 'od_resnet50', 'od_resnet101',
                'od_mobilenetv2_050', 'od_mobilenetv2_075',
                'od_mobilenetv2_100')
# Listed in an error message before the rest is counted.
_LISTED = 12
_OUR_LEAVES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
               ('params', 'scale'): 'weight',
               ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}


def _listing(items) -> str:
  items = list(items)
  shown = ', '.join(items[:_LISTED])
  if len(items) > _LISTED:
    shown += f', ... ({len(items) - _LISTED} more)'
  return shown


def _odconv_unwrap(state_dict) -> dict:
  """{'state_dict': sd} (the official main.py's checkpoint) -> sd, without
  DataParallel's 'module.' prefix."""
  if not hasattr(state_dict, 'items'):
    raise ValueError(f'state_dict must be a mapping of names to tensors, got '
                     f'{type(state_dict).__name__}.')
  if hasattr(state_dict.get('state_dict'), 'items'):
    state_dict = state_dict['state_dict']
  unwrapped = {}
  for key, value in state_dict.items():
    name = key[len('module.'):] if key.startswith('module.') else key
    if name in unwrapped:
      raise ValueError(f'state_dict key {name!r} appears both with and '
                       f"without the 'module.' prefix.")
    unwrapped[name] = value
  return unwrapped


def odconv_num_experts(state_dict) -> int:
  """K, the kernels per ODConv, from an official ODConv state_dict: the
  leading dim of every 5-D ODConv2d `weight` [K, Cout, Cin/g, k, k] (kept
  for K = 1); ValueError when there is none or the layers disagree."""
  state_dict = _odconv_unwrap(state_dict)
  by_k = {}
  for key, value in state_dict.items():
    if key.endswith('weight') and len(tuple(value.shape)) == 5:
      by_k.setdefault(int(value.shape[0]), []).append(key)
  if not by_k:
    raise ValueError(
        'no ODConv weight in the state_dict: the official ODConv2d keeps a '
        '5-D `<conv>.weight` [K, Cout, Cin/groups, k, k]; keys seen: '
        f'{_listing(state_dict)}.')
  if len(by_k) > 1:
    detail = '; '.join(f'K={k} in {_listing(keys)}'
                       for k, keys in sorted(by_k.items()))
    raise ValueError(f'K (the leading dim of the ODConv weights) differs '
                     f'between layers: {detail}.')
  (k,) = by_k
  return k


def _odconv_module_names(model) -> dict:
  """Our top-level module name -> (the official module name, {our child
  name: official child name}) for an od_* model."""
  if hasattr(model, 'depth_layers'):  # OD_ResNet
    names = {'conv1': ('conv1', {}), 'bn1': ('bn1', {}),
             'classifier': ('', {'fc': 'fc'})}
    inside = {'downsample': 'downsample.0', 'downsample_bn': 'downsample.1'}
    for stage, size in enumerate(STAGE_SIZES[model.depth_layers], 1):
      for i in range(size):
        names[f'layer{stage}_{i}'] = (f'layer{stage}.{i}', inside)
    return names
  # OD_MobileNetV2: features.0 stem, features.1..n blocks, features.n+1 head.
  names = {'conv_stem': ('features.0.0', {}), 'bn1': ('features.0.1', {}),
           'classifier': ('classifier', {'fc': '1'})}
  index = 0
  for stage_number, (stage, repeats) in enumerate(
      zip(model.stages, stage_repeats(model.stages, model.depth)), 1):
    if stage.expand == 1:  # conv = [dw ODConvBNReLU, pw-linear, BN]
      inside = {'conv_dw': 'conv.0.0', 'bn1': 'conv.0.1',
                'conv_pw': 'conv.1', 'bn2': 'conv.2'}
    else:  # conv = [pw ODConvBNReLU, dw ODConvBNReLU, pw-linear, BN]
      inside = {'conv_pw': 'conv.0.0', 'bn1': 'conv.0.1',
                'conv_dw': 'conv.1.0', 'bn2': 'conv.1.1',
                'conv_pwl': 'conv.2', 'bn3': 'conv.3'}
    for i in range(repeats):
      index += 1
      names[f'blocks_{stage_number - 1}_{i}'] = (f'features.{index}', inside)
  names['conv_head'] = (f'features.{index + 1}.0', {})
  names['bn2'] = (f'features.{index + 1}.1', {})
  return names


def _odconv_key(names, collection, path) -> str:
  """('layer1_0', 'conv1', 'attention', 'fc', 'kernel') in params ->
  'layer1.0.conv1.attention.fc.weight'."""
  head, inside = names[path[0]]
  module = list(path[1:-1])
  if module and module[0] in inside:
    module[0] = inside[module[0]]
  leaf = _OUR_LEAVES[(collection, path[-1])]
  return '.'.join(p for p in (head, *module, leaf) if p)


def _odconv_torch_shape(path, shape) -> tuple:
  """The official tensor's shape for one of our leaves."""
  if path[-1] != 'kernel':
    return tuple(shape)
  if len(shape) == 5:  # ODConv2d [K, O, I/g, kh, kw]
    k, kh, kw, cin, cout = shape
    return (k, cout, cin, kh, kw)
  if len(shape) == 4:  # Conv2d [O, I/g, kh, kw]
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if 'attention' in path:  # the attention's 1x1 Conv2d [out, in, 1, 1]
    return (shape[1], shape[0], 1, 1)
  return (shape[1], shape[0])  # Linear [out, in]


def _odconv_to_ours(value: np.ndarray, target_shape) -> np.ndarray:
  if len(target_shape) == 5:
    return value.transpose(0, 3, 4, 2, 1)
  if len(target_shape) == 4:
    return value.transpose(2, 3, 1, 0)
  if len(target_shape) == 2:
    return value.reshape(value.shape[0], value.shape[1]).T
  return value


def _odconv_guess(state_dict) -> str | None:
  """The official architecture whose layout the keys have, if any."""
  if 'features.0.0.weight' in state_dict:  # OD_MobileNetV2: the stem width
    return {32: 'od_mobilenetv2_100', 24: 'od_mobilenetv2_075',
            16: 'od_mobilenetv2_050'}.get(
                int(state_dict['features.0.0.weight'].shape[0]))
  blocks = {key.split('.')[1] for key in state_dict
            if key.startswith('layer3.')}
  bottleneck = any('.conv3.' in key for key in state_dict)
  return {(False, 2): 'od_resnet18', (False, 6): 'od_resnet34',
          (True, 6): 'od_resnet50', (True, 23): 'od_resnet101'}.get(
              (bottleneck, len(blocks)))


def from_odconv(state_dict, arch: str):
  """An official ODConv (OSVAI/ODConv) state_dict -> (model, variables).

  arch: one of ODCONV_ARCHS, the official model name. The state_dict may be
  main.py's checkpoint ({'state_dict': ...}, keys prefixed 'module.').
  K comes from the weights; the model is `get_model(arch, num_experts=K)`
  (PyTorch padding and BN eps 1e-5, as the official model); evaluate it at
  temperature 1 (the default), as the official main.py does.

  Raises ValueError for an unknown arch, a state_dict without ODConv weights
  or with K differing between layers, and one that does not match the
  architecture: every state_dict key the model has no place for, every
  model tensor the state_dict lacks (by its official name) and every shape
  that differs are listed.
  """
  if arch not in ODCONV_ARCHS:
    raise ValueError(f'unknown ODConv architecture {arch!r}; supported: '
                     f'{", ".join(ODCONV_ARCHS)}.')
  state_dict = _odconv_unwrap(state_dict)
  num_experts = odconv_num_experts(state_dict)
  model = get_model(arch, num_experts=num_experts)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  names = _odconv_module_names(model)
  expected = {}  # official key -> (collection, our path, our shape)
  for collection in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(
        abstract[collection]).items():
      expected[_odconv_key(names, collection, path)] = (collection, path,
                                                        leaf.shape)
  filled = {'params': {}, 'batch_stats': {}}
  seen, unexpected, mismatched = set(), [], []
  for key, value in state_dict.items():
    if key.endswith(IGNORED_SUFFIXES):
      continue
    if key not in expected:
      unexpected.append(key)
      continue
    seen.add(key)
    collection, path, shape = expected[key]
    want = _odconv_torch_shape(path, shape)
    if tuple(value.shape) != want:
      mismatched.append(f'{key} is {tuple(value.shape)}, expected {want}')
      continue
    filled[collection][path] = _odconv_to_ours(_to_numpy(value), shape)
  missing = [key for key in expected if key not in seen]
  problems = []
  if unexpected:
    problems.append(f'{len(unexpected)} state_dict key(s) the model has no '
                    f'place for: {_listing(unexpected)}')
  if missing:
    problems.append(f'{len(missing)} key(s) missing from the state_dict: '
                    f'{_listing(missing)}')
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatch(es): '
                    f'{_listing(mismatched)}')
  if problems:
    guess = _odconv_guess(state_dict)
    hint = (f' Its keys look like {guess}\'s.' if guess and guess != arch
            else '')
    raise ValueError(f'the state_dict does not match {arch} with '
                     f'K={num_experts}: ' + '; '.join(problems) + '.' + hint)
  return model, {c: traverse_util.unflatten_dict(v)
                 for c, v in filled.items()}


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


def eval_config(model_name: str, num_experts: int | None = None):
  """The ImageNet evaluation config for converted weights. num_experts: K of
  converted ODConv weights (ODCONV_ARCHS; `odconv_num_experts`)."""
  if model_name in ODCONV_ARCHS:
    return _odconv_eval_config(model_name, num_experts)
  spec = _spec(model_name)
  c = get_base_config()
  c.model = spec.architecture
  for key, value in spec.model_kwargs().items():
    c[key] = value
  c.normalization = spec.normalization
  c.image_size = spec.image_size
  c.ema_decay = 0.0  # the converted weights are already the EMA weights
  return c


def _odconv_eval_config(arch: str, num_experts):
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f'{arch}: num_experts must be the K of the converted '
                     f'weights (an int >= 1), got {num_experts!r}.')
  c = get_base_config()
  c.model = arch
  c.num_experts = num_experts
  # The official model's: PyTorch padding, BatchNorm eps 1e-5 (get_model's
  # defaults for od_*; written out so the config says what the weights need).
  c.padding = 'symmetric'
  c.bn_epsilon = 1e-5
  # Dropout is left at the model's default: it does nothing at evaluation,
  # and the rate each released checkpoint was trained with is not recorded
  # (main.py's --dropout; the README's examples use 0.2).
  # The official main.py's evaluation: ImageNet mean/std, Resize(256) +
  # CenterCrop(224), i.e. the central 224/256 of the shorter side at 224
  # (our pipeline resizes that crop bicubically; torchvision bilinearly).
  c.normalization = 'imagenet'
  c.image_size = 224
  c.ema_decay = 0.0  # main.py keeps no EMA: the weights are the model's
  # main.py --evaluate runs the attentions at temperature 1 (annealing
  # ends there after 10 epochs); evaluation uses temperature_final.
  c.temperature_final = 1.0
  return c


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True,
                      choices=sorted(TIMM_MODELS) + list(ODCONV_ARCHS),
                      help='a timm model, or an official ODConv arch (K is '
                      'read from the weights)')
  parser.add_argument('--weights', required=True,
                      help='.pth, .bin or .safetensors state_dict (an '
                      "official ODConv main.py checkpoint too: its "
                      "'state_dict', without the 'module.' prefix)")
  parser.add_argument('--out', required=True, help='output folder')
  args = parser.parse_args(argv)
  state_dict = load_state_dict(args.weights)
  summary = {'model': args.model}
  if args.model in ODCONV_ARCHS:
    model, variables = from_odconv(state_dict, args.model)
    config = eval_config(args.model, model.num_experts)
    summary['num_experts'] = model.num_experts
  else:
    variables = from_timm(state_dict, args.model)
    config = eval_config(args.model)
  save_variables(variables, args.out, config)
  count = sum(np.prod(v.shape) for v in jax.tree.leaves(variables['params']))
  print(json.dumps({**summary, 'params': int(count), 'out': args.out}))


if __name__ == '__main__':
  main()
