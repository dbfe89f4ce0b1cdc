"""bench/latency.py's timeline: the experiment's wall time split by the processes that spent it."""

import importlib.util
import os
import subprocess
import sys
import time

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("latency", ROOT / "bench" / "latency.py")
latency = importlib.util.module_from_spec(spec)
spec.loader.exec_module(latency)

# a stand-in for `dvc exp run`: pauses of known length around two stages, and a short-lived
# daemon of its own (as DVC starts for its updater) that must not be taken for DVC itself
FAKE_DVC = """\
import subprocess, sys, time
time.sleep(0.3)
subprocess.Popen([sys.executable, "-c", "pass", "daemon"]).wait()
subprocess.run([sys.executable, "stages/train.py"], check=True)
time.sleep(0.4)
subprocess.run([sys.executable, "stages/evaluate.py"], check=True)
time.sleep(0.5)
"""
FAKE_TRAIN = "import time; time.sleep(0.6); time.sleep(0.8)  # start-up, then 'training'\n"
FAKE_EVALUATE = "import time; time.sleep(0.7)\n"


def test_the_timeline_splits_the_wall_time_by_process(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "dvc.py").write_text(FAKE_DVC)
    (tmp_path / "stages" / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "stages" / "evaluate.py").write_text(FAKE_EVALUATE)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(latency.TIMELINE_HOOK)
    log = tmp_path / "timeline.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hook"), "FMNIST_LATENCY_LOG": str(log)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "dvc.py"], cwd=tmp_path, env=env, check=True)
    wall = time.perf_counter() - start

    parts = latency.timeline(log, training=0.8)
    slack = 1.0  # an interpreter's start-up and exit, on a busy machine
    for key, pause in (("dvc_before_s", 0.3), ("train_beyond_training_s", 0.6), ("dvc_between_s", 0.4),
                       ("evaluate_s", 0.7), ("dvc_after_s", 0.5)):
        assert pause <= parts[key] < pause + slack, (key, parts)
    assert sum(parts.values()) + 0.8 <= wall
