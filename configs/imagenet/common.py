"""Recipes shared by the ImageNet experiment files (../shared/PAPER.md).

Hardware and time: these configs target a TPU v3/v4 slice or a multi-GPU
host; none has been run to completion in this project (no ImageNet here), so
no training time is claimed. Throughput on your hardware: the progress bar
prints images/s and the ETA from the first hundred steps.
"""

from configs import base


def tpu_recipe(model: str, num_experts: int = 0, **overrides):
  """The official EfficientNet/MnasNet TPU recipe: RMSProp (TF), 0.016 per 256
  with 5 warm-up epochs, x0.97 every 2.4 epochs, 350 epochs, batch 2048,
  weight decay 1e-5, label smoothing 0.1, EMA 0.9999, bf16."""
  c = base.get_base_config()
  c.model = model
  c.num_experts = num_experts
  c.dtype = 'bfloat16'
  c.batch_size = 2048
  c.num_epochs = 350.0
  c.warmup_epochs = 5.0
  c.optimizer = 'rmsprop'
  c.learning_rate = 0.016
  c.lr_schedule = 'exponential'
  c.lr_decay_rate = 0.97
  c.lr_decay_epochs = 2.4
  c.weight_decay = 1e-5
  c.label_smoothing = 0.1
  c.ema_decay = 0.9999
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.update(overrides)
  return c


def resnet_recipe(num_experts: int = 0, **overrides):
  """The standard ResNet-50 recipe: SGD with Nesterov momentum 0.9, 0.1 per
  256 with 5 warm-up epochs and cosine decay, 90 epochs, batch 1024, weight
  decay 1e-4 (kernels only), label smoothing 0.1, BN momentum 0.9."""
  c = base.get_base_config()
  c.model = 'resnet50'
  c.num_experts = num_experts
  c.dtype = 'bfloat16'
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.warmup_epochs = 5.0
  c.optimizer = 'sgd'
  c.nesterov = True
  c.learning_rate = 0.1
  c.lr_schedule = 'cosine'
  c.weight_decay = 1e-4
  c.label_smoothing = 0.1
  c.ema_decay = 0.0
  c.checkpoint_every_steps = 2000
  c.update(overrides)
  return c
