"""Shared fixtures. The GCS emulator's address is fixed (and exported) when
this file is imported, before any storage client is first used; the server
itself starts only if a test asks for it."""

import os
import tempfile
import uuid

import pytest

# The PyTorch peers and TensorFlow (data pipelines) share this process, and
# importing torchvision 0.29 after TensorFlow 2.21 segfaults (in triton,
# which torchvision's models load); the other order works. Test modules are
# collected in name order, so the peers are loaded here, first.
try:
  import timm  # noqa: F401  pylint: disable=unused-import
  import torchvision.models  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass

from tests import gcs_emulator

# Many tests (and the processes they start) compile the same tiny training
# and evaluation steps: a compilation cache shared by this session's
# processes compiles each once. Fresh per session, so nothing stale is read.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

_EMULATOR = gcs_emulator.GcsEmulator(gcs_emulator.free_port())
os.environ.update(gcs_emulator.environment(_EMULATOR.url))


@pytest.fixture(scope='session')
def gcs_server():
  _EMULATOR.start()
  yield _EMULATOR
  _EMULATOR.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
  """A fresh bucket on the local GCS server: 'gs://<name>'."""
  name = f'test-{uuid.uuid4().hex[:12]}'
  gcs_server.create_bucket(name)
  return f'gs://{name}'
