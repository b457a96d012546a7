"""The backend whose fastest forms the convolutions take.

Every place that picks a form (`static_ops.static_form`, the depthwise
implementation, `pooling.max_pool`, `strategy.resolve`) asks `backend()`:
JAX's default backend, or, inside `exporting_for(runtime)`, the runtime an
exported model will run in ('litert' or 'onnx'), whose fast kernels want
other forms than XLA:CPU's (docs/export.md). Tracing reads it, so it must
be set around the trace (`jax.jit` caches are keyed without it: export
traces afresh).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

# Runtimes outside XLA that an exported model can target.
EXPORT_RUNTIMES = ('litert', 'onnx')

_runtime = contextvars.ContextVar('condconv_export_runtime', default=None)


def backend() -> str:
  """The export runtime being traced for, else `jax.default_backend()`."""
  return _runtime.get() or jax.default_backend()


@contextlib.contextmanager
def exporting_for(runtime: str):
  """Traces inside pick the forms `runtime` runs fastest."""
  if runtime not in EXPORT_RUNTIMES:
    raise ValueError(f'runtime must be one of {", ".join(EXPORT_RUNTIMES)}; '
                     f'got {runtime!r}.')
  token = _runtime.set(runtime)
  try:
    yield
  finally:
    _runtime.reset(token)
