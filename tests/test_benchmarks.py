"""The profile attribution of benchmarks/profile_step.py (pure functions)."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'benchmarks'))
import profile_step  # pylint: disable=g-import-not-at-top


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


def test_op_names_reads_top_level_instructions():
  hlo = '''
  %ynn_fusion.7 = f32[16,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%f, metadata={op_name="jit(train)/jvp(M)/x/mix_experts/dot_general" stack_frame_id=1}
  ROOT %dot.2 = f32[2]{0} dot(%c, %d), metadata={op_name="jit(train)/sub"}
  %copy.1 = f32[2]{0} copy(%e)
'''
  assert profile_step.op_names(hlo) == {
      'ynn_fusion.7': 'jit(train)/jvp(M)/x/mix_experts/dot_general',
      'dot.2': 'jit(train)/sub'}
