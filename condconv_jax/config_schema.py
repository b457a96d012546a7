"""Every field a config may set, with defaults, and the config a run wrote.

Experiment files (`configs/`) start from `get_base_config()` and change
values; a new or misspelled key errors, because the config is locked.
"""

from __future__ import annotations

import json

import ml_collections
from ml_collections import config_dict

from condconv_jax import paths


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model (condconv_jax.models.get_model).
  c.model = 'mobilenet_v1'
  c.num_experts = 0  # 0 = the static baseline
  c.width = 1.0
  c.depth = 1.0
  c.dtype = 'float32'  # compute dtype; 'bfloat16' on TPU/GPU. Params: f32.
  c.dropout_rate = config_dict.placeholder(float)  # None: model default
  c.drop_path_rate = config_dict.placeholder(float)
  c.bn_momentum = config_dict.placeholder(float)
  c.bn_epsilon = config_dict.placeholder(float)
  c.activation = config_dict.placeholder(str)
  c.padding = config_dict.placeholder(str)
  c.strategy = config_dict.placeholder(str)
  c.routing_dropout = config_dict.placeholder(float)
  # 'condconv', 'dyconv' or 'odconv' (None: the model's; 'dy_*'/'od_*'
  # names set their own).
  c.conv_family = config_dict.placeholder(str)
  # 'tf' or 'torch' initializers (None: the model's; models/blocks.py).
  c.init_style = config_dict.placeholder(str)
  c.model_kwargs = ml_collections.ConfigDict()  # e.g. placement overrides
  # Data.
  c.dataset = 'imagenet2012'  # a name in condconv_jax.data.DATASETS
  c.data_dir = ''
  c.image_size = 224
  c.normalization = 'imagenet'
  c.augment = 'inception'  # ImageNet: or 'none'; Fashion-MNIST: 'shift_flip'
  c.eval_split = ''  # '' = the dataset's evaluation split
  # Detection on large images (the tree crowns): source pixels of a
  # training crop and an evaluation tile, each resized to image_size (0:
  # the dataset's default); training crops' sizes drawn log-uniformly
  # within a factor 1 + scale_jitter of it.
  c.crop_size = 0
  c.scale_jitter = 0.0
  # Detection: the score over which a detection counts for box precision
  # and recall (None: the evaluated split's best-F1 threshold).
  c.score_threshold = config_dict.placeholder(float)
  # Detection: the SSD loss preset, 'tf_coco' (sigmoid + hard negative
  # mining, ssd_mobilenet_v1_coco.config) or 'tf_tpu_focal' (the TPU config).
  c.detection_loss = 'tf_coco'
  c.loss_kwargs = ml_collections.ConfigDict()  # SSDLoss fields to override
  # detection.postprocess arguments to override (e.g. iou_threshold, NMS's).
  c.postprocess_kwargs = ml_collections.ConfigDict()
  # Optimization. learning_rate is per 256 examples (scaled by batch_size).
  c.batch_size = 256  # global, over all devices and hosts
  c.num_epochs = 350.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.warmup_epochs = 5.0
  c.warmup_start = 0.0  # the warm-up starts at this fraction of the peak
  c.optimizer = 'rmsprop'
  c.learning_rate = 0.016
  c.lr_schedule = 'exponential'
  c.lr_decay_rate = 0.97
  c.lr_decay_epochs = 2.4
  c.lr_milestone_epochs = ()  # lr_schedule='step': decay at these epochs
  c.momentum = 0.9
  c.nesterov = True
  c.rmsprop_decay = 0.9
  c.rmsprop_epsilon = 1e-3
  c.weight_decay = 1e-5
  # 'all_but_batchnorm' (the official TF EfficientNet/MnasNet/CondConv rule)
  # or 'kernels' (conv/dense kernels only, the ResNet recipe's).
  c.weight_decay_params = 'all_but_batchnorm'
  c.label_smoothing = 0.1
  c.ema_decay = 0.9999  # 0 disables; evaluation uses the EMA when enabled
  # DyConv/ODConv softmax temperature, linear from initial to final over
  # temperature_epochs, then final (evaluation uses final); 1, 1 = none.
  c.temperature_initial = 1.0
  c.temperature_final = 1.0
  c.temperature_epochs = 0.0
  # Loop.
  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # Train one run per value and print them side by side (the embedded job).
  c.compare_num_experts = ()
  # ... for each of these seeds (() = config.seed only).
  c.compare_seeds = ()
  # A static run's workdir (its latest checkpoint, EMA weights where it
  # keeps an EMA) or a folder of converted weights: a fresh run starts from
  # them, upcycled into this CondConv model (condconv_jax.upcycle). A run
  # that has checkpoints of its own resumes from those instead.
  c.init_from = ''
  c.lock()  # experiment files may change values, not add keys
  return c


def load_config(directory) -> ml_collections.ConfigDict:
  """The resolved config a run (or the converter) wrote to `directory`, as
  a locked ConfigDict."""
  path = paths.as_path(directory) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: pass --config, or point '
                            f'--workdir at a training workdir.')
  saved = json.loads(path.read_text())
  config = get_base_config()
  with config.unlocked():  # free-form dicts: their keys are not in the base
    config.model_kwargs = saved.pop('model_kwargs', {})
    config.loss_kwargs = saved.pop('loss_kwargs', {})
    config.postprocess_kwargs = saved.pop('postprocess_kwargs', {})
  saved['compare_num_experts'] = tuple(saved.get('compare_num_experts', ()))
  saved['compare_seeds'] = tuple(saved.get('compare_seeds', ()))
  saved['lr_milestone_epochs'] = tuple(saved.get('lr_milestone_epochs', ()))
  config.update(saved)
  return config
