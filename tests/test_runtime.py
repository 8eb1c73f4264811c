"""pspnet_keras/runtime.py: how every command chooses its Keras backend and starts TensorFlow (thread pools,
oneDNN), and that the user's settings win."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "variable, config, expected",
    [
        (None, None, "tensorflow the default"),
        ("jax", None, "jax KERAS_BACKEND"),
        (None, "torch", "torch keras.json"),
        ("jax", "torch", "jax KERAS_BACKEND"),  # the variable wins over the file, as in Keras
    ],
)
def test_keras_starts_on_the_backend_chosen_the_keras_way(tmp_path, variable, config, expected):
    """KERAS_BACKEND, else the "backend" of ~/.keras/keras.json, else TensorFlow (keras.io, "Configuring
    your backend"); Keras itself reports the backend it started on."""
    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    if config is not None:
        (home / ".keras" / "keras.json").write_text(json.dumps({"backend": config}))
    environment = {name: value for name, value in os.environ.items() if name not in ("KERAS_BACKEND", "KERAS_HOME")}
    environment["HOME"] = str(home)
    if variable is not None:
        environment["KERAS_BACKEND"] = variable
    result = subprocess.run(
        [sys.executable, "-c", "from pspnet_keras import runtime; keras = runtime.import_keras(); "
         "print(keras.backend.backend(), runtime.backend_source())"],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT, env=environment,
    )
    assert (result.returncode, result.stdout) == (0, expected + "\n"), result.stderr
