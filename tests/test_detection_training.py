"""The detector through the one training loop: a step and COCO metrics on
mock COCO, exact resume, and the same COCO numbers on 1 and 2 processes."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import traverse_util

from condconv_jax import config_schema
from condconv_jax.training import detection_figure, trainer
from configs.coco import common
from tests import tiny
from tests.test_coco import mock_coco  # noqa: F401  pylint: disable=unused-import
from tests.test_trainer import _finish, _free_port, _run, _start_processes


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_train_step_and_coco_evaluation_on_mock_coco(tmp_path, mock_coco):  # pylint: disable=redefined-outer-name
  # Static: compiling the CondConv detector costs half a minute here;
  # tests/test_ssd.py trains its step.
  cfg = common.ssd_config(0, common.TF_COCO_RECIPE)
  cfg.update(dict(width=0.25, image_size=64, batch_size=4, num_train_steps=2,
                  log_every_steps=1, checkpoint_every_steps=2))
  state, summary = trainer.train_and_evaluate(cfg, tmp_path)
  assert int(state.step) == 2
  assert summary['eval_count'] == 8  # every mock image once (2 batches)
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'):
    assert -1.0 <= summary[f'eval_{name}'] <= 1.0
  logged = [json.loads(line) for line in
            (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train = [line for line in logged if line['split'] == 'train']
  assert [line['step'] for line in train] == [1, 2]
  assert all(np.isfinite(line['loss']) and line['positives_per_image'] >= 0
             for line in train)
  assert [line['split'] for line in logged].count('eval') == 1


def _params(state):
  return traverse_util.flatten_dict(jax.device_get(state.params), sep='/')


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_detection_run_resumes_exactly(tmp_path):
  cfg = tiny.detection_config(num_train_steps=4)
  straight, _ = trainer.train_and_evaluate(cfg, tmp_path / 'straight')

  def preempt_at_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = tmp_path / 'resumed'
  first, summary = trainer.train_and_evaluate(cfg, workdir,
                                              step_hooks=[preempt_at_2])
  assert summary['preempted'] and int(first.step) == 2
  # eval.py rebuilds the run from config.json, free-form dicts included.
  # (JSON keeps tuples as lists.)
  saved = config_schema.load_config(workdir)
  for field in ('loss_kwargs', 'model_kwargs'):
    want = json.loads(json.dumps(cfg[field].to_dict()))
    assert saved[field].to_dict() == want != {}, field
  resumed, summary = trainer.train_and_evaluate(cfg, workdir)
  assert int(resumed.step) == 4
  a, b = _params(straight), _params(resumed)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_two_processes_give_the_same_coco_numbers_as_one(tmp_path):
  """The detections of both processes reach process 0's pycocotools run:
  AP and the image count equal a single process's (the 10 validation
  tiles, each once)."""
  results = _finish(_start_processes([tmp_path / 'two'] * 2,
                                     f'127.0.0.1:{_free_port()}', 2,
                                     '--detection'))
  summaries = []
  for returncode, out, err in results:
    assert returncode == 0, err[-3000:]
    summaries.append(json.loads(out.strip().splitlines()[-1]))
  results = _finish(_start_processes([tmp_path / 'one'], None, 2,
                                     '--detection'))
  returncode, out, err = results[0]
  assert returncode == 0, err[-3000:]
  single = json.loads(out.strip().splitlines()[-1])
  assert summaries[0] == summaries[1]  # every process reports the same
  assert single['eval_count'] == summaries[0]['eval_count'] == 10
  for name in ('AP', 'AP50', 'AR100'):
    assert summaries[0][f'eval_{name}'] == pytest.approx(
        single[f'eval_{name}'], abs=1e-4), name


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_detections_picture_shows_the_evaluation_images(tmp_path):
  cfg = tiny.detection_config(num_train_steps=2)
  trainer.train_and_evaluate(cfg, tmp_path)
  run, variables = trainer.restore_for_eval(cfg, tmp_path)
  examples = detection_figure.first_images(run, variables, count=3)
  first = next(iter(run.dataset.eval_batches(cfg.eval_split)))
  assert len(examples) == 3
  for i, example in enumerate(examples):
    np.testing.assert_array_equal(example['image'], first['image'][i])
    np.testing.assert_allclose(example['gt_boxes'][example['gt_mask']],
                               first['boxes'][i][first['box_mask'][i]])
    scores = example['scores'][:int(example['count'])]
    assert np.all((scores >= 0) & (scores <= 1))
  path = tmp_path / 'detections.png'
  detection_figure.plot(examples, path)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow  # end-to-end: `pytest -m slow`
def test_tree_crown_job_over_seeds_and_eval_of_the_comparison(tmp_path):
  """train.py over two seeds (static model, a few steps): per-run test
  report at a threshold chosen on validation, pictures, the table with its
  mean ± sd row; eval.py on the comparison folder: every run, one PR curve
  each, the same threshold and test numbers as train.py reported."""
  workdir = tmp_path / 'trees'
  png, pr = tmp_path / 'trees.png', tmp_path / 'pr.png'
  result = _run(['train.py', '--config', 'configs/tree_crowns.py',
                 '--workdir', str(workdir), '--config.num_train_steps=3',
                 '--config.batch_size=4', '--config.image_size=96',
                 '--config.width=0.25',
                 '--config.crop_size=192', '--config.compare_num_experts=(0,)',
                 '--config.compare_seeds=(0, 1)'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| mean ± sd | 0 |' in result.stdout
  compare = json.loads((workdir / 'compare.json').read_text())
  assert sorted(compare) == ['seed_0/experts_0', 'seed_1/experts_0']
  for key, summary in compare.items():
    run_dir = workdir / key
    assert (run_dir / 'detections.png').exists()
    assert (run_dir / 'pr.png').exists()
    assert 0 < summary['eval_score_threshold'] < 1
    assert 'validation_AP50' in summary and 'eval_box_recall' in summary
  result = _run(['eval.py', '--workdir', str(workdir), '--pr_png', str(pr),
                 '--detections_png', str(png), '--num_images', '2'])
  assert result.returncode == 0, result.stderr[-3000:]
  evaluated = json.loads(result.stdout)
  assert len(evaluated) == 2
  for source, metrics in evaluated.items():
    key = os.path.relpath(source, workdir)
    for name in ('AP50', 'box_precision', 'box_recall', 'score_threshold'):
      assert metrics[name] == pytest.approx(compare[key][f'eval_{name}'],
                                            abs=1e-6, nan_ok=True), name
    assert metrics['count'] == 2  # the two test images, stitched
  for path in (png, pr):
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
