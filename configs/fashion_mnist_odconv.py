"""The embedded experiment with ODConv (Li, Zhou, Yao, 2022), 1x and 4x.

Command (CPU, 2 cores; docs/training.md gives the measured times):
  python train.py --config configs/fashion_mnist_odconv.py --workdir /tmp/fm_od

configs/fashion_mnist.py's model and recipe with every conv but the stem an
ODConv (the classifier static), trained with K = 1 and K = 4 kernels side
by side, and the official temperature annealing scaled to the run: 30 to 1
linearly over the first 10% of training (0.5 of 5 epochs; the official
recipe anneals over 10 of 100-150 epochs).
"""

from configs import fashion_mnist


def get_config():
  c = fashion_mnist.get_config()
  c.conv_family = 'odconv'
  c.compare_num_experts = (1, 4)
  c.temperature_initial = 30.0
  c.temperature_final = 1.0
  c.temperature_epochs = 0.5
  return c
