"""The embedded default: a small MobileNet and its CondConv twin on Fashion-MNIST.

Command (CPU, 2 cores: a few minutes for both runs; docs/training.md gives
the measured times):
  python train.py --config configs/fashion_mnist.py --workdir /tmp/fashion

Data: the Debian package dataset-fashion-mnist (`apt-get install
dataset-fashion-mnist`), or tfds.load('fashion_mnist') where it can download.
It trains mobilenet_v1_mini static and with 8 experts (CondConv in separable
layers 4-6 and the classifier) on the same recipe and seed, then prints test
accuracy, parameters and MADDs side by side. docs/training.md reports the
comparison over 3 seeds.
"""

from condconv_jax.config_schema import get_base_config


def get_config():
  c = get_base_config()
  c.model = 'mobilenet_v1_mini'
  c.compare_num_experts = (0, 8)
  c.dataset = 'fashion_mnist'
  c.image_size = 28
  c.augment = 'shift_flip'
  c.batch_size = 128
  c.num_epochs = 5.0
  c.warmup_epochs = 0.5
  c.optimizer = 'adam'
  c.learning_rate = 0.004
  c.lr_schedule = 'cosine'
  c.weight_decay = 1e-5
  c.label_smoothing = 0.0
  c.ema_decay = 0.0
  c.bn_momentum = 0.9
  c.log_every_steps = 50
  c.eval_every_epochs = 5
  c.checkpoint_every_steps = 500
  return c
