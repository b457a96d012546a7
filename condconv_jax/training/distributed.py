"""Multi-host start-up flags shared by train.py and eval.py.

--distributed: jax.distributed.initialize() auto-detects the cluster (Cloud
TPU pods, SLURM, ...); or name it with --coordinator_address,
--num_processes and --process_id. Call `initialize()` before any other JAX
call: it also installs JAX's preemption notifier (SIGTERM), which
`preemption.PreemptionWatch` relies on across processes.
"""

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() (cluster auto-detected).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')


def initialize():
  if _COORDINATOR.value or _DISTRIBUTED.value:
    # CPU-only jobs need gloo for cross-process collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
