"""The benchmarks' own logic: profile_step.py's attribution (pure
functions), model_bench.py's argument checks, depthwise_variants.py's forms."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import condconv_jax
from benchmarks import depthwise_variants, profile_step
from tests import reference
from tests import test_ops

ROOT = pathlib.Path(__file__).parents[1]


def test_shared_durations_split_overlaps_evenly():
  # Microseconds: a [0, 10], c inside it [2, 4], b [5, 15]. Hand-computed:
  # a = 2 + 2/2 + 1 + 5/2 = 6.5, c = 2/2 = 1, b = 5/2 + 5 = 7.5.
  got = profile_step.shared_durations([('a', 0, 10), ('c', 2, 4),
                                       ('b', 5, 15)])
  assert got['a'] == pytest.approx(6.5e-3)
  assert got['c'] == pytest.approx(1e-3)
  assert got['b'] == pytest.approx(7.5e-3)
  assert sum(got.values()) == pytest.approx(15e-3)  # the busy wall time


def test_shared_durations_zero_length_events_take_no_share():
  got = profile_step.shared_durations([('a', 0, 10), ('z', 5, 5)])
  assert got['a'] == pytest.approx(10e-3)
  assert got['z'] == 0


def test_shared_durations_leave_gaps_out():
  got = profile_step.shared_durations([('a', 0, 2), ('b', 5, 6)])
  assert got == {'a': pytest.approx(2e-3), 'b': pytest.approx(1e-3)}


def test_categories_from_op_names():
  cat = profile_step.category
  fwd = 'jit(train)/jvp(ResNet)/layer4_0/conv2/'
  bwd = 'jit(train)/transpose(jvp(ResNet))/layer4_0/conv2/'
  assert cat(bwd + 'conditional_conv_loop/mix_experts/dot_general') == (
      'kernel mixing')
  assert cat(fwd + 'conditional_conv_direct/dot_general') == 'CondConv conv'
  assert cat(fwd + 'routing/dense/dot_general') == 'routing'
  assert cat(fwd + 'static_conv_matmul/dot_general') == 'static conv'
  assert cat(fwd + 'bn/add') == 'other (BN, activations, pads, copies)'
  assert cat('jit(train)/sub') == 'optimizer update'
  assert cat('jit(infer)/ResNet/fc/dot_general') == (
      'other (BN, activations, pads, copies)')


def test_op_names_reads_every_instruction_and_what_a_fusion_calls():
  # XLA gives some fusions only a scheduling_name: they take the op_name of
  # their fused computation's root, else of its last named instruction
  # (the multi-output fusion below roots in a tuple), through nested calls.
  hlo = '''
%fused_reduce.3 (param_0: f32[8]) -> (f32[2], f32[8]) {
  %param_0 = f32[8]{0} parameter(0), metadata={scheduling_name="param_0"}
  %slice.1 = f32[8]{0} slice(%param_0), metadata={op_name="jit(train)/jvp(M)/c/pad"}
  %reduce.2 = f32[2]{0} reduce(%slice.1), metadata={op_name="jit(train)/transpose(jvp(M))/c/reduce_sum"}
  ROOT %tuple.4 = (f32[2]{0}, f32[8]{0}) tuple(%reduce.2, %slice.1)
}

%fused_outer (param_0.1: f32[8]) -> f32[8] {
  %param_0.1 = f32[8]{0} parameter(0)
  ROOT %fusion.9 = (f32[2]{0}, f32[8]{0}) fusion(%param_0.1), kind=kInput, calls=%fused_reduce.3
}

ENTRY %main.5 (a: f32[16,8]) -> f32[2] {
  %ynn_fusion.7 = f32[16,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%f, metadata={op_name="jit(train)/jvp(M)/x/mix_experts/dot_general" stack_frame_id=1}
  %input_reduce_fusion.3 = (f32[2]{0}, f32[8]{0}) fusion(%a), kind=kInput, calls=%fused_reduce.3, metadata={scheduling_name="input_reduce_fusion.3"}
  %outer_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_outer, metadata={scheduling_name="outer_fusion"}
  %copy.1 = f32[2]{0} copy(%e)
  ROOT %dot.2 = f32[2]{0} dot(%c, %d), metadata={op_name="jit(train)/sub"}
}
'''
  names = profile_step.op_names(hlo)
  assert names['ynn_fusion.7'] == 'jit(train)/jvp(M)/x/mix_experts/dot_general'
  assert names['dot.2'] == 'jit(train)/sub'
  assert names['copy.1'] == ''
  assert names['input_reduce_fusion.3'] == (
      'jit(train)/transpose(jvp(M))/c/reduce_sum')
  assert names['outer_fusion'] == names['input_reduce_fusion.3']


def test_timed_events_take_the_gpu_kernels_and_their_instructions():
  # On a GPU the host events only launch kernels: the device process's
  # events are the ones timed, named by args['hlo_op'], or inside a command
  # buffer (CUDA graph) by the fusion's kernel name; library kernels there
  # name no instruction but keep their time.
  trace = {'traceEvents': [
      {'ph': 'M', 'name': 'process_name', 'pid': 1,
       'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'name': 'process_name', 'pid': 7,
       'args': {'name': '/device:GPU:0'}},
      {'ph': 'X', 'pid': 1, 'name': 'fusion.1', 'ts': 0, 'dur': 1},
      {'ph': 'X', 'pid': 7, 'name': 'loop_multiply_fusion', 'ts': 5,
       'dur': 3, 'args': {'hlo_op': 'fusion.1'}},
      {'ph': 'X', 'pid': 7, 'name': 'input_reduce_fusion_6', 'ts': 9,
       'dur': 2, 'args': {'hlo_op': 'command_buffer_3'}},
      {'ph': 'X', 'pid': 7, 'name': 'nvjet_sm90_tst_64x256', 'ts': 12,
       'dur': 4, 'args': {'hlo_op': 'command_buffer_3'}},
  ]}
  instructions = {'fusion.1': 'a', 'input_reduce_fusion.6': 'b'}
  assert profile_step.timed_events(trace, instructions) == [
      ('fusion.1', 5, 8), ('input_reduce_fusion.6', 9, 11), (None, 12, 16)]


def test_timed_events_on_cpu_are_the_host_thunks():
  trace = [{'ph': 'M', 'name': 'process_name', 'pid': 1,
            'args': {'name': '/host:CPU'}},
           {'ph': 'X', 'pid': 1, 'name': 'dot.2', 'ts': 3, 'dur': 4},
           {'ph': 'X', 'pid': 1, 'name': 'PjitFunction(train)', 'ts': 0,
            'dur': 9},
           {'ph': 'i', 'pid': 1, 'name': 'marker', 'ts': 3}]
  assert profile_step.timed_events(trace, {'dot.2': 'a'}) == [('dot.2', 3, 7)]


HLO = '''
  %fusion.1 = f32[8]{0} fusion(%a), metadata={op_name="jit(train)/jvp(M)/c/mix_experts/dot_general"}
  %fusion.2 = f32[8]{0} fusion(%b), metadata={op_name="jit(train)/transpose(jvp(M))/c/conditional_conv_direct/dot_general"}
  %copy.3 = f32[8]{0} copy(%b)
'''


def test_breakdown_adds_up_categories_directions_and_launches():
  trace = [{'ph': 'X', 'pid': 1, 'name': 'fusion.1', 'ts': 0, 'dur': 2000},
           {'ph': 'X', 'pid': 1, 'name': 'fusion.2', 'ts': 2000, 'dur': 500},
           {'ph': 'X', 'pid': 1, 'name': 'fusion.2', 'ts': 2500, 'dur': 500},
           {'ph': 'X', 'pid': 1, 'name': 'copy.3', 'ts': 3000, 'dur': 250},
           {'ph': 'X', 'pid': 1, 'name': 'not_in_hlo', 'ts': 0, 'dur': 9000}]
  got = profile_step.breakdown(trace, HLO)
  assert got.categories == {'kernel mixing': pytest.approx(2.0),
                            'CondConv conv': pytest.approx(1.0),
                            profile_step.UNNAMED: pytest.approx(0.25)}
  assert got.directions == {'forward': pytest.approx(2.0),
                            'backward': pytest.approx(1.0)}
  assert [(op, launches) for _, op, _, launches in got.ops] == [
      ('fusion.1', 1), ('fusion.2', 2), ('copy.3', 1)]
  gpu = [{'ph': 'M', 'name': 'process_name', 'pid': 2,
          'args': {'name': '/device:GPU:0'}},
         {'ph': 'X', 'pid': 2, 'name': 'fusion_2', 'ts': 0, 'dur': 1000,
          'args': {'hlo_op': 'command_buffer_1'}},
         {'ph': 'X', 'pid': 2, 'name': 'cublas_gemm', 'ts': 1000, 'dur': 3000,
          'args': {'hlo_op': 'command_buffer_1'}}]
  got = profile_step.breakdown(gpu, HLO)
  assert got.categories == {'CondConv conv': pytest.approx(1.0),
                            profile_step.UNNAMED: pytest.approx(3.0)}
  assert got.directions == {'backward': pytest.approx(1.0)}
  with pytest.raises(ValueError, match='names an instruction'):
    profile_step.breakdown(trace[4:], HLO)


def test_saved_profiles_load_back(tmp_path):
  trace = [{'ph': 'X', 'pid': 1, 'name': 'fusion.1', 'ts': 0, 'dur': 2000}]
  about = {'model': 'resnet50', 'batch': 128, 'dtype': 'bfloat16'}
  profile_step.save_profile(tmp_path, about, 'CondConv-8', 'infer', trace,
                            HLO)
  assert profile_step.load_about(tmp_path) == about
  assert profile_step.load_profile(tmp_path, 'CondConv-8', 'infer') == (
      trace, HLO)
  with pytest.raises(SystemExit, match='no saved train step'):
    profile_step.load_profile(tmp_path, 'CondConv-8', 'train')
  with pytest.raises(SystemExit, match='no about.json'):
    profile_step.load_about(tmp_path / 'elsewhere')


@pytest.mark.parametrize('specs, message', [
    (['auto', 'dw=vmap'], "unknown conv kind 'dw'"),
    (['direct'], 'must start with auto'),
])
def test_model_bench_rejects_bad_strategy_specs(specs, message):
  done = subprocess.run([sys.executable, '-m', 'benchmarks.model_bench',
                         '--cc-strategies', *specs], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
  assert done.returncode == 2 and message in done.stderr


# The library's depthwise cases with more than one example (the candidates
# leave batch 1 to the library), plus EfficientNet's 5x5 stride-2 geometry.
DEPTHWISE_CASES = [c for c in test_ops.CASES
                   if c[0] in ('depthwise', 'depthwise mult2 stride2')] + [
    ('depthwise 5x5 dilated valid B2', 2, (11, 10), 2, 2, (5, 5), (1, 1),
     'VALID', 1, 2, 2, 3),
    ('depthwise 5x5 stride2 even', 2, (8, 8), 3, 3, (5, 5), (2, 2), 'SAME',
     1, 1, 3, 2),
]


@pytest.mark.parametrize('variant', sorted(depthwise_variants.CANDIDATES))
@pytest.mark.parametrize('case', DEPTHWISE_CASES, ids=lambda c: c[0])
def test_depthwise_candidates_match_float64_reference(variant, case):
  # Each candidate form, through the CondConv op while it stands in, against
  # the float64 loops: value and every gradient.
  x, experts, routing, bias, kwargs, conv = test_ops.make_case(case)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  layer = lambda *args: condconv_jax.conditional_conv(*args, strategy='direct',
                                                      **kwargs)
  dy = np.random.default_rng(1).standard_normal(
      reference.mixture_of_experts(conv, x, experts, routing, bias).shape)
  loss = lambda *args: jnp.vdot(layer(*args), f32(dy))
  args = (f32(x), f32(experts), f32(routing), f32(bias))
  with depthwise_variants.depthwise_form(variant) as replaced:
    # The candidate, not the library's form, is what got traced: barriers on
    # the output, the incoming and the input gradient, and XLA's conv only
    # where it computes the kernel gradient.
    program = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args))
    assert program.count('optimization_barrier') == 3
    assert ('conv_general_dilated' in program) == variant.endswith('xla_dk')
    assert replaced
    y = jax.jit(layer)(*args)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  assert test_ops.rel_err(y, reference.mixture_of_experts(
      conv, x, experts, routing, bias)) <= 1e-5
  for name, got, want in zip(('x', 'experts', 'routing', 'bias'), grads,
                             reference.mixture_of_experts_vjp(
                                 conv, x, experts, routing, bias, dy)):
    assert test_ops.rel_err(got, want) <= 1e-5, name
  # Outside the context the library's form is back (a new function: JAX
  # caches what it traced per function).
  assert 'optimization_barrier' not in str(jax.make_jaxpr(
      lambda *a: layer(*a))(*args))


def test_depthwise_candidate_kernel_gradient_is_checked():
  with pytest.raises(ValueError, match="kernel_grad must be one of"):
    depthwise_variants.materialized_shifted('xla_dk')


def test_kernel_grad_bench_times_both_gradients_and_names_the_rule():
  # 2*8*8 outputs (below the threshold) and 1*64*64 = 4096 (at it).
  done = subprocess.run([sys.executable, '-m', 'benchmarks.kernel_grad_bench',
                         '--shapes', '2,8,3,4,3,1', '1,64,2,2,3,1',
                         '--repeats', '1'],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  rows = [line for line in done.stdout.splitlines() if line.startswith('| ')]
  assert rows[1].startswith('| 2,8,3,4,3,1 | 128 |')
  assert rows[1].endswith('| xla |')
  assert rows[2].startswith('| 1,64,2,2,3,1 | 4096 |')
  assert rows[2].endswith('| im2col_grad |')
