"""CondConv (Yang et al., NeurIPS 2019) for JAX/Flax.

Modules: `CondConv` (drop-in for flax.linen.Conv), `Routing`,
`DepthwiseConv` (a static depthwise conv, fast on CPU), and CondConv's
successors `DynamicConv` (Chen et al., 2020) and `ODConv` (Li et al., 2022).
Pure functions: `conditional_conv`, `omni_dimensional_conv`, `mix_experts`,
`depthwise_conv`. NNX faces: `condconv_jax.nnx`.
"""

from condconv_jax.dynamic_layers import DynamicConv, ODConv
from condconv_jax.layers import CondConv, DepthwiseConv, Routing
from condconv_jax.ops import (conditional_conv, mix_experts,
                              omni_dimensional_conv)
from condconv_jax.static_ops import depthwise_conv
from condconv_jax.upcycling import upcycle
from condconv_jax.strategy import STRATEGIES

__all__ = [
    'STRATEGIES', 'CondConv', 'DepthwiseConv', 'DynamicConv', 'ODConv',
    'Routing', 'conditional_conv', 'depthwise_conv', 'mix_experts',
    'omni_dimensional_conv', 'upcycle',
]
