"""Runs an exported model in its own runtime, and checks it against Flax.

The runtimes are the ones deployments use: LiteRT's interpreter
(`ai_edge_litert`), ONNX Runtime, `jax.export.deserialize` and TF's
SavedModel loader. Each `run_*` takes the exported artifact and a float32
NHWC batch and returns the outputs as a list of NumPy arrays, in the
export's output order.
"""

from __future__ import annotations

import os

import numpy as np

# Default threads: the benchmark's setting (docs/export.md), 2 on this VM.
NUM_THREADS = min(os.cpu_count() or 1, 2)


def run_tflite(model: bytes, images: np.ndarray, num_threads: int =
               NUM_THREADS) -> list[np.ndarray]:
  interpreter = tflite_interpreter(model, num_threads)
  interpreter.set_tensor(interpreter.get_input_details()[0]['index'], images)
  interpreter.invoke()
  return [interpreter.get_tensor(detail['index'])
          for detail in _tflite_outputs(interpreter)]


def tflite_interpreter(model: bytes, num_threads: int = NUM_THREADS):
  """An allocated `ai_edge_litert` interpreter (XNNPACK, the default)."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
  interpreter = Interpreter(model_content=model, num_threads=num_threads)
  interpreter.allocate_tensors()
  return interpreter


def _tflite_outputs(interpreter):
  # The converter orders outputs by name ('Identity', 'Identity_1', ...):
  # sort them back to the function's order.
  details = interpreter.get_output_details()
  return sorted(details, key=lambda d: _identity_index(d['name']))


def _identity_index(name: str) -> int:
  suffix = name.rsplit('Identity', 1)[-1].lstrip('_').split(':')[0]
  return int(suffix) if suffix.isdigit() else 0


def onnx_session(model: bytes, num_threads: int = NUM_THREADS):
  """An ONNX Runtime CPU session with `num_threads` intra-op threads."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = num_threads
  options.inter_op_num_threads = 1
  options.log_severity_level = 3  # shape-merge warnings on every NHWC conv
  return onnxruntime.InferenceSession(model, options,
                                      providers=['CPUExecutionProvider'])


def run_onnx(model: bytes, images: np.ndarray,
             num_threads: int = NUM_THREADS) -> list[np.ndarray]:
  session = onnx_session(model, num_threads)
  return session.run(None, {session.get_inputs()[0].name: images})


def run_stablehlo(serialized: bytes, images: np.ndarray) -> list[np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  exported = jax.export.deserialize(bytearray(serialized))
  return [np.asarray(out) for out in exported.call(images)]


def run_savedmodel(path: str, images: np.ndarray) -> list[np.ndarray]:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  serve = tf.saved_model.load(path).signatures['serving_default']
  out = serve(images=tf.constant(images))
  return [out[name].numpy() for name in sorted(out)]


def run(format_name: str, artifact, images: np.ndarray) -> list[np.ndarray]:
  """`run_<format_name>` (artifact: bytes, or the SavedModel's path)."""
  runners = {'tflite': run_tflite, 'onnx': run_onnx,
             'stablehlo': run_stablehlo, 'savedmodel': run_savedmodel}
  return runners[format_name](artifact, images)


def relative_error(outputs, expected) -> float:
  """max |a - b| / max |b| over each output, the worst of them."""
  if len(outputs) != len(expected):
    raise ValueError(f'{len(outputs)} outputs, expected {len(expected)}.')
  worst = 0.0
  for got, want in zip(outputs, expected):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
      raise ValueError(f'an output has shape {got.shape}, expected '
                       f'{want.shape}.')
    scale = max(float(np.max(np.abs(want))), 1e-30)
    worst = max(worst, float(np.max(np.abs(got - want))) / scale)
  return worst
