"""The embedded experiment with Dynamic Convolution (Chen et al., 2020).

Command (CPU, 2 cores; docs/training.md gives the measured times):
  python train.py --config configs/fashion_mnist_dyconv.py --workdir /tmp/fm_dy

configs/fashion_mnist.py's model and recipe with K = 4 dynamic kernels in
every conv but the stem (the classifier static), and the paper's
temperature annealing scaled to the run: the softmax temperature falls
linearly from 30 to 1 over the first 10% of training (0.5 of 5 epochs; the
paper anneals over 10 of 300 epochs, ODConv over 10 of 100-150).
"""

from configs import fashion_mnist


def get_config():
  c = fashion_mnist.get_config()
  c.conv_family = 'dyconv'
  c.compare_num_experts = (4,)
  c.temperature_initial = 30.0
  c.temperature_final = 1.0
  c.temperature_epochs = 0.5
  return c
