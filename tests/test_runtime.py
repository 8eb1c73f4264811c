"""pspnet_keras/runtime.py: how every command starts TensorFlow (thread pools, oneDNN), and that the user's settings win."""

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VARIABLES = ("TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_ENABLE_ONEDNN_OPTS")
# Imports TensorFlow as the commands do, then reports the settings it started with.
PROGRAM = (
    "import json, os; from pspnet_keras import runtime; tf = runtime.import_tensorflow(); "
    f"print(json.dumps({{name: os.environ.get(name) for name in {VARIABLES!r}}}))"
)


def started_with(**variables):
    """The three settings a fresh process running PROGRAM reports, with `variables` set and no others."""
    environment = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
        env=environment | variables,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tensorflow_starts_with_one_inter_op_thread_a_thread_per_usable_core_and_onednn_off():
    assert started_with() == {
        "TF_NUM_INTEROP_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": str(len(os.sched_getaffinity(0))),
        "TF_ENABLE_ONEDNN_OPTS": "0",
    }


def test_the_users_settings_win():
    chosen = {"TF_NUM_INTEROP_THREADS": "3", "TF_NUM_INTRAOP_THREADS": "5", "TF_ENABLE_ONEDNN_OPTS": "1"}
    assert started_with(**chosen) == chosen


def test_intra_op_threads_follow_the_cores_this_process_may_use():
    environment = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300,
        cwd=PROJECT_ROOT, env=environment,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["TF_NUM_INTRAOP_THREADS"] == "1"


def test_keras_runs_on_tensorflow_whatever_keras_backend_says(tmp_path):
    """A backend named by the user's KERAS_BACKEND or ~/.keras/keras.json (here one that is not even
    installed) does not reach the commands, whose network and protocol use TensorFlow's functions."""
    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    (home / ".keras" / "keras.json").write_text(json.dumps({"backend": "no_such_backend"}))
    for variables in ({"KERAS_BACKEND": "no_such_backend"}, {"HOME": str(home)}):
        environment = {name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"}
        result = subprocess.run(
            [sys.executable, "-c", "from pspnet_keras import runtime; runtime.import_tensorflow(); import keras; "
             "print(keras.backend.backend())"],
            capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT, env=environment | variables,
        )
        assert (result.returncode, result.stdout) == (0, "tensorflow\n"), result.stderr
