"""An independent float64 NumPy reference for (conditional) convolutions.

Written from the definition of a dilated, strided, padded, grouped
cross-correlation, with explicit loops over output pixels and kernel taps and
no JAX in it, so the strategies under test are checked against arithmetic
they do not share. Also gives the vector-Jacobian products by the same loops.
"""

import numpy as np


def explicit_padding(padding, in_size, kernel, stride, in_dil, k_dil):
  """TF/lax SAME and VALID, ints and pairs -> [(lo, hi), (lo, hi)]."""
  if isinstance(padding, str):
    pads = []
    for n, k, s, di, dk in zip(in_size, kernel, stride, in_dil, k_dil):
      n_dil = (n - 1) * di + 1
      window = (k - 1) * dk + 1
      if padding == 'VALID':
        pads.append((0, 0))
        continue
      out = -(-n_dil // s)
      total = max(0, (out - 1) * s + window - n_dil)
      pads.append((total // 2, total - total // 2))
    return pads
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _index_map(n, k, s, di, dk, pad):
  """For each output o and tap t: the input index it reads, or -1 (a zero)."""
  lo, hi = pad
  span = (n - 1) * di + 1 + lo + hi
  window = (k - 1) * dk + 1
  out = (span - window) // s + 1
  idx = -np.ones((out, k), np.int64)
  for o in range(out):
    for t in range(k):
      pos = o * s + t * dk - lo  # position in the input-dilated grid
      if pos >= 0 and pos % di == 0 and pos // di < n:
        idx[o, t] = pos // di
  return idx


class Conv:
  """A fixed conv geometry; `apply` and its VJPs, per-example kernels."""

  def __init__(self, x_shape, kernel_shape, strides=(1, 1), padding='SAME',
               input_dilation=(1, 1), kernel_dilation=(1, 1), groups=1):
    _, h, w, cin = x_shape
    kh, kw, cin_g, cout = kernel_shape
    self.groups, self.cin_g, self.cout_g = groups, cin_g, cout // groups
    pads = explicit_padding(padding, (h, w), (kh, kw), strides,
                            input_dilation, kernel_dilation)
    self.rows = _index_map(h, kh, strides[0], input_dilation[0],
                           kernel_dilation[0], pads[0])
    self.cols = _index_map(w, kw, strides[1], input_dilation[1],
                           kernel_dilation[1], pads[1])
    self.x_shape, self.cout = x_shape, cout

  def _loops(self):
    for oh, row in enumerate(self.rows):
      for ow, col in enumerate(self.cols):
        for i, ih in enumerate(row):
          for j, iw in enumerate(col):
            if ih >= 0 and iw >= 0:
              for g in range(self.groups):
                cin = slice(g * self.cin_g, (g + 1) * self.cin_g)
                cout = slice(g * self.cout_g, (g + 1) * self.cout_g)
                yield oh, ow, i, j, ih, iw, cin, cout

  def apply(self, x, kernels):
    """x [B, H, W, Cin], kernels [B, kh, kw, Cin/g, Cout] -> y."""
    b = x.shape[0]
    y = np.zeros((b, len(self.rows), len(self.cols), self.cout))
    for oh, ow, i, j, ih, iw, cin, cout in self._loops():
      y[:, oh, ow, cout] += np.einsum('bc,bco->bo', x[:, ih, iw, cin],
                                      kernels[:, i, j, :, cout])
    return y

  def vjp(self, x, kernels, dy):
    """(dL/dx, dL/dkernels) for dL/dy = dy."""
    dx = np.zeros_like(x)
    dk = np.zeros_like(kernels)
    for oh, ow, i, j, ih, iw, cin, cout in self._loops():
      dx[:, ih, iw, cin] += np.einsum('bo,bco->bc', dy[:, oh, ow, cout],
                                      kernels[:, i, j, :, cout])
      dk[:, i, j, :, cout] += np.einsum('bc,bo->bco', x[:, ih, iw, cin],
                                        dy[:, oh, ow, cout])
    return dx, dk


def mixture_of_experts(conv: Conv, x, experts, routing, bias=None):
  """sum_e r_e (W_e * x) + sum_e r_e b_e, by E separate convolutions."""
  b = x.shape[0]
  y = 0
  for e in range(experts.shape[0]):
    kernels = np.broadcast_to(experts[e], (b, *experts.shape[1:]))
    y = y + routing[:, e, None, None, None] * conv.apply(x, kernels)
  if bias is not None:
    y = y + (routing @ bias)[:, None, None, :]
  return y


def mixture_of_experts_vjp(conv: Conv, x, experts, routing, bias, dy):
  """Gradients of sum(dy * mixture_of_experts(...)) w.r.t. every input."""
  b = x.shape[0]
  dx = np.zeros_like(x)
  d_experts = np.zeros_like(experts)
  d_routing = np.zeros_like(routing)
  for e in range(experts.shape[0]):
    kernels = np.broadcast_to(experts[e], (b, *experts.shape[1:])).copy()
    y_e = conv.apply(x, kernels)
    d_routing[:, e] = np.sum(dy * y_e, axis=(1, 2, 3))
    dx_e, dk_e = conv.vjp(x, kernels, dy)
    dx += routing[:, e, None, None, None] * dx_e
    d_experts[e] = np.einsum('b,b...->...', routing[:, e], dk_e)
  d_bias = None
  if bias is not None:
    d_routing += dy.sum(axis=(1, 2)) @ bias.T
    d_bias = routing.T @ dy.sum(axis=(1, 2))
  return dx, d_experts, d_routing, d_bias


# Dynamic Convolution and ODConv, transcribed from the papers' equations
# (Chen et al. 2020, eqs. 1-3; Li, Zhou, Yao 2022, eq. 5 and Fig. 2), with
# the parameter trees of condconv_jax's layers as plain float64 arrays.

def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def dynamic_conv(conv: Conv, x, params, temperature):
  """y = (sum_k pi_k W_k) * x + sum_k pi_k b_k with
  pi = softmax(FC2(ReLU(FC1(GAP(x)))) / T)."""
  att = params['attention']
  pooled = x.mean(axis=(1, 2))
  hidden = np.maximum(pooled @ att['fc1']['kernel'] + att['fc1']['bias'], 0)
  pi = _softmax((hidden @ att['fc2']['kernel'] + att['fc2']['bias']) /
                temperature)
  kernels = np.einsum('bk,k...->b...', pi, params['kernel'])
  y = conv.apply(x, kernels)
  if 'bias' in params:
    y = y + (pi @ params['bias'])[:, None, None, :]
  return y


def odconv(conv: Conv, x, params, batch_stats, temperature, train=False,
           epsilon=1e-5):
  """y = (x * a_c) * (sum_k a_w,k a_s W_k) * a_f (+ bias), the attentions
  from GAP -> fc -> BN -> ReLU -> per-attention fc / T. BatchNorm uses the
  batch's statistics when train, else the running ones."""
  att = params['attention']
  pooled = x.mean(axis=(1, 2))
  h = pooled @ att['fc']['kernel']
  if train:
    mean, var = h.mean(axis=0), h.var(axis=0)
  else:
    mean, var = batch_stats['mean'], batch_stats['var']
  h = (h - mean) / np.sqrt(var + epsilon) * att['bn']['scale'] + att['bn']['bias']
  h = np.maximum(h, 0)
  head = lambda name: (h @ att[f'{name}_fc']['kernel'] +
                       att[f'{name}_fc']['bias']) / temperature
  experts = params['kernel']
  b, (kh, kw) = x.shape[0], experts.shape[1:3]
  channel = _sigmoid(head('channel'))
  filt = _sigmoid(head('filter')) if 'filter_fc' in att else 1.0
  spatial = (_sigmoid(head('spatial')).reshape(b, kh, kw)
             if 'spatial_fc' in att else np.ones((b, kh, kw)))
  kernel_att = (_softmax(head('kernel')) if 'kernel_fc' in att
                else np.ones((b, 1)))
  kernels = np.einsum('bk,bij,kijco->bijco', kernel_att, spatial, experts)
  y = conv.apply(x * channel[:, None, None, :], kernels)
  y = y * (filt[:, None, None, :] if np.ndim(filt) else filt)
  if 'bias' in params:
    y = y + params['bias']
  return y
