"""What a CPU run must set before JAX starts: the allocator.

    from condconv_jax import cpu_setup
    cpu_setup.use_tcmalloc()   # first thing in main(), before jax runs

XLA:CPU allocates and frees its large temporaries (activations, gradients)
every step. glibc's malloc hands blocks that large back to the kernel and
takes them again, so they page-fault on every step; tcmalloc keeps them,
which halves some training steps (docs/speed.md).

The allocator must be chosen before the process starts, so `use_tcmalloc`
re-executes the same command line once with LD_PRELOAD set, when Debian's
`libtcmalloc-minimal4` is installed and nothing else is preloaded. It does
nothing when the library is missing, off Linux, when LD_PRELOAD is already
set, or with CONDCONV_MALLOC=system in the environment.
"""

from __future__ import annotations

import os
import sys

TCMALLOC = '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'
_OPT_OUT = 'CONDCONV_MALLOC'


def use_tcmalloc(library: str = TCMALLOC) -> None:
  """Re-executes this process with `library` preloaded, if it can (see the
  module doc). Returns when nothing is to be done; otherwise never."""
  if (not sys.platform.startswith('linux') or
      os.environ.get(_OPT_OUT) == 'system' or
      os.environ.get('LD_PRELOAD') or not os.path.exists(library)):
    return
  env = dict(os.environ, LD_PRELOAD=library)  # set: the child won't re-exec
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the command line as typed ('-m pkg.mod' included).
  os.execve(sys.executable, list(sys.orig_argv), env)


def allocator() -> str:
  """The preloaded allocator's file name, or 'glibc malloc'."""
  preloaded = os.environ.get('LD_PRELOAD', '')
  return os.path.basename(preloaded) if preloaded else 'glibc malloc'
