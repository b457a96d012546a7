"""CondConv (Yang et al., NeurIPS 2019) for JAX/Flax.

Modules: `CondConv` (drop-in for flax.linen.Conv), `Routing`,
`DepthwiseConv` (a static depthwise conv, fast on CPU). Pure functions:
`conditional_conv`, `mix_experts`, `depthwise_conv`.
"""

from condconv_jax.layers import CondConv, DepthwiseConv, Routing
from condconv_jax.ops import conditional_conv, mix_experts
from condconv_jax.static_ops import depthwise_conv
from condconv_jax.upcycling import upcycle
from condconv_jax.strategy import STRATEGIES

__all__ = [
    'STRATEGIES', 'CondConv', 'DepthwiseConv', 'Routing', 'conditional_conv',
    'depthwise_conv', 'mix_experts', 'upcycle',
]
