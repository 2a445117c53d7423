"""KerasImageEstimator on a two-executor local-cluster: multi-worker training, tuning in
parallel, a killed worker, save/load/score.

The scenarios run in one fresh process (``tests/estimator_cluster_run.py``): a local-cluster
needs its own SparkContext, and this suite's session fixture is ``local[2]``. The data is an
easy 10-class task (a bright block per label on noise, 400 train / 100 validation / 200 test
images), so driver and multi-worker training both reach (near) 100 % and can be compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("estimator-cluster") / "out.json"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "estimator_cluster_run.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("traceback", result)
    return result


pytestmark = pytest.mark.cluster


def test_two_worker_fit_ends_with_identical_weights_and_matches_driver_training(record):
    assert record["executors"] == 3  # the driver's block manager + two executor JVMs
    two, driver = _ok(record["two_workers"]), _ok(record["driver"])
    assert len(two["digests"]) == 2 and two["digests"][0] == two["digests"][1]
    # Both workers share this host: bound (bindCores=auto) to one core each, not the same one.
    (first,), (second,) = two["worker_cores"]
    assert first != second
    assert len(two["history"]["val_loss"]) == 2  # validated every epoch
    assert abs(two["top1"] - driver["top1"]) <= 0.003
    assert two["top1"] >= 0.95 and driver["top1"] >= 0.95


def test_the_chief_writes_tensorboard_scalars_as_each_epoch_ends(record):
    two = _ok(record["two_workers"])
    board, history = two["tensorboard"], two["history"]
    assert set(board) == {"train", "validation"}  # the chief's runs only: no per-worker copies
    for run, prefix in (("train", ""), ("validation", "val_")):
        for name in ("loss", "top1"):
            events = board[run][f"epoch_{name}"]
            assert [e[0] for e in events] == [0, 1]  # steps are epochs, from 0
            assert [e[1] for e in events] == pytest.approx(history[prefix + name])
    # Written when each epoch ended, not all at once after the fit: the writes are an epoch's
    # training time apart (a write after the fit would put them milliseconds apart).
    (_, _, first), (_, _, second) = board["train"]["epoch_loss"]
    assert second - first >= 0.5 * two["epoch_seconds"][1] > 0
    # Driver training writes the same runs and tags (Keras' callback).
    driver = _ok(record["driver"])["tensorboard"]
    assert [e[1] for e in driver["validation"]["epoch_loss"]] == pytest.approx(
        _ok(record["driver"])["history"]["val_loss"])
    assert set(board["train"]) <= set(driver["train"])


def test_the_driver_logs_each_epoch_of_executor_training_as_it_ends(record):
    two, members = _ok(record["two_workers"]), _ok(record["resumed_member"])
    # The chief's lines only, one per epoch, with its metrics.
    assert [line.split(" in ")[0] for line in two["epoch_lines"]] == [
        "the 2-worker model: epoch 1/2", "the 2-worker model: epoch 2/2"]
    assert "val_top1=" in two["epoch_lines"][-1]
    assert "; fit: 1/2 epochs (50 %), " in two["epoch_lines"][0]
    # Two members of three epochs each; the killed member's retry resumes from its checkpoint.
    started = {line.split(" in ")[0] for line in members["epoch_lines"]}
    assert started == {f"model {m} of 2: epoch {e}/3" for m in (0, 1) for e in (1, 2, 3)}
    assert "; fit: 6/6 epochs (100 %)" in members["epoch_lines"][-1]


def test_fitted_model_saves_loads_and_scores_the_same(record):
    two = _ok(record["two_workers"])
    assert Path(two["model_path"]).is_file()
    assert two["loaded_uid_equal"] and two["loaded_params_equal"]
    assert two["rows"] == 200 and two["probabilities_equal"]


def test_cross_validator_fits_its_candidates_concurrently_on_the_executors(record):
    cv = _ok(record["cross_validation"])
    assert cv["learning_rates"] == [[0.01, 0.003], [0.01, 0.003]]
    for first, second in cv["folds"]:  # two folds, two candidates each
        assert first["started"] < second["ended"] and second["started"] < first["ended"]
        assert first["pid"] != second["pid"]
    # One epoch on 200 rows per fold: the candidates differ, the better one well above chance.
    assert len(cv["metrics"]) == 2 and cv["metrics"][0] != cv["metrics"][1]
    assert max(cv["metrics"]) >= 0.5
    assert cv["best_top1"] >= 0.8
    # One TensorBoard run per candidate and fold: each fold's fitMultiple call has its folder.
    # The last run, at the top, is CrossValidator's refit of the best candidate on all rows.
    runs = cv["tensorboard_runs"]
    calls = sorted({r.split("/")[0] for r in runs[:-1]})
    assert len(calls) == 2 and all(c.startswith("fit-") for c in calls)
    assert runs == [*(f"{c}/model-{i}/train" for c in calls for i in (0, 1)), "train"]


def test_a_worker_killed_mid_training_fails_the_fit_with_a_clear_error(record):
    killed = record["killed_worker"]
    assert killed["error"] is not None
    assert "TrainingWorkerError" in killed["error"]
    assert "training worker 1 of 2 exited with code 137 (killed)" in killed["error"]
    assert killed["seconds"] < 180  # an error, not a wait for the collective timeout or a hang


def test_a_fit_with_a_checkpoint_dir_survives_a_killed_worker_and_resumes(record):
    # 400 training rows, batch 32: 13 steps an epoch; worker 1 dies before step 16 (epoch 2).
    fit = _ok(record["resumed_workers"])
    # Spark retried the barrier stage; the retry went on from the end of epoch 1.
    assert fit["resumed_from_epoch"] == [1] and fit["epochs"] == [3]
    assert fit["digests"][0] == fit["digests"][1]
    assert fit["top1"] >= 0.95
    assert fit["left_behind"] == []  # a finished fit removes its checkpoint
    # The restarted chief went on writing the same TensorBoard run: every epoch, once.
    (board,) = fit["tensorboard"]
    events = board["validation"]["epoch_loss"]
    assert [e[0] for e in events] == [0, 1, 2]
    assert [e[1] for e in events] == pytest.approx(fit["histories"][0]["val_loss"])


def test_an_ensemble_member_killed_mid_training_resumes_from_its_checkpoint(record):
    fit = _ok(record["resumed_member"])
    # Only member 0's task was killed and retried (by Spark's task retry).
    assert fit["resumed_from_epoch"] == [1, None] and fit["epochs"] == [3, 3]
    assert fit["top1"] >= 0.95
    assert fit["left_behind"] == []
    # One TensorBoard run per member (Keras' callback in each task), every epoch once.
    assert len(fit["tensorboard"]) == 2
    for board, history in zip(fit["tensorboard"], fit["histories"], strict=True):
        events = board["validation"]["epoch_loss"]
        assert [e[0] for e in events] == [0, 1, 2]
        assert [e[1] for e in events] == pytest.approx(history["val_loss"])
