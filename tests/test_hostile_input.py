"""Hostile and careless input common to every command: a user model's description that is a FIFO,
Ctrl-C and SIGTERM while a command starts, SIGTERM while Ray starts, and an image that kills every
Ray worker it is given.

Every case runs the command as a user would, in a child process with a deadline, and checks
the exit status, the whole of stderr (one line, no traceback) and what is left on disk.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.synthetic_caffe import write_classifier_only_weights
from helpers import save_image
from helpers import smooth_image
from pspnet_keras import models
from pspnet_keras import ray_pool

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("pspnet.py", "evaluate.py", "train.py", "export.py", "weight_converter.py")
# Seconds a refused command may take at most before it counts as hung.
DEADLINE_S = 120
DESCRIPTION = {
    "format": "pspnet-keras", "version": 1, "depth": 50, "classes": 2, "crop_size": 41, "base_size": 48,
    "class_names": ["background", "thing"], "palette": [[0, 0, 0], [200, 0, 0]],
}


def start(script, *args, cwd=None, env=None):
    """`python <script> *args` started as a user would, its output captured."""
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / script), *map(str, args)], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished(process):
    """(exit status, stdout, stderr) of a started command, which must end before DEADLINE_S."""
    stdout, stderr = process.communicate(timeout=DEADLINE_S)
    return process.returncode, stdout, stderr


def folders_dataset(root):
    """A two-class folders-layout dataset of one training and one validation sample."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\nthing\n")
    for split in ("train", "val"):
        save_image(root / "images" / split / "a.png", smooth_image(48, 48, 1))
        label = smooth_image(48, 48, 2)[..., 0] // 128
        save_image(root / "labels" / split / "a.png", label.astype("uint8"))
    return root


@pytest.fixture
def fifo_model(tmp_path):
    """Weights whose description beside them is a FIFO that nobody writes: reading it would block."""
    weights = write_classifier_only_weights(tmp_path / "mine.h5", 2)
    os.mkfifo(weights.with_suffix(".json"))
    return weights


@pytest.mark.parametrize(
    "script, arguments",
    [
        ("pspnet.py", ["-w", "{weights}", "-i", "{image}", "-o", "{out}/a.png"]),
        ("evaluate.py", ["-w", "{weights}", "--data", "{data}", "--dataset", "folders"]),
        ("export.py", ["-w", "{weights}", "--format", "keras", "-o", "{out}/mine.keras"]),
        ("train.py", ["--init", "{weights}", "--data", "{data}", "--dataset", "folders", "--out", "{out}/run"]),
    ],
)
def test_a_fifo_as_the_description_beside_the_weights_is_one_line_not_a_hang(tmp_path, fifo_model, script,
                                                                              arguments):
    image = save_image(tmp_path / "photo.png", smooth_image(30, 40, 3))
    data = folders_dataset(tmp_path / "data")
    values = {"weights": fifo_model, "image": image, "data": data, "out": tmp_path / "out"}
    code, stdout, stderr = finished(start(script, *[argument.format(**values) for argument in arguments],
                                          cwd=tmp_path))
    prefix = f"{script}: " if script == "evaluate.py" else f"{script}: error: "
    suffix = " (the description beside the --init weights)" if script == "train.py" else ""
    assert (code, stderr) == (1, f"{prefix}{fifo_model.with_suffix('.json')}: is a FIFO, not a regular file{suffix}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", COMMANDS)
@pytest.mark.parametrize("signum, code, reason", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_a_signal_while_a_command_imports_is_one_line_and_its_exit_status(tmp_path, script, signum, code, reason):
    """The signal comes as soon as the command's first import is done, while it imports the rest: Python's
    -X importtime reports each import on stderr as it ends (its lines are then left out of stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(PROJECT_ROOT / script), "--help"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in process.stderr:
        if line.rstrip().endswith("| pspnet_keras.startup"):
            break
    process.send_signal(signum)
    stdout, rest = process.communicate(timeout=DEADLINE_S)
    stderr = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert (process.returncode, stderr, stdout) == (code, [f"{script}: {reason}"], "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_while_ray_starts_stops_what_it_started_and_exits_143(tmp_path):
    weights = write_classifier_only_weights(tmp_path / "mine.h5", 2)
    weights.with_suffix(".json").write_text(json.dumps(DESCRIPTION))
    image = save_image(tmp_path / "photo.png", smooth_image(30, 40, 3))
    process = start("pspnet.py", "-w", weights, "-i", image, "-o", tmp_path / "out" / "a.png", "--ray", cwd=tmp_path)
    deadline = time.monotonic() + DEADLINE_S
    while not ray_pool.ray_processes_below(process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = ray_pool.ray_processes_below(process.pid)
    assert started, "Ray did not start"
    process.send_signal(signal.SIGTERM)
    code, stdout, stderr = finished(process)
    assert (code, stderr) == (143, "pspnet.py: terminated\n")
    time.sleep(1)
    left = [pid for pid in started if Path(f"/proc/{pid}").exists() and "Z" not in status_of(pid)]
    assert left == []
    assert not (tmp_path / "out").exists()


def status_of(pid):
    """The state letter of a process (proc(5): R, S, Z for a zombie ...), empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


POISON_HOOK = '''
import os
import signal
import sys

from PIL import Image

opened = Image.open


def open_or_die(path, *args, **kwargs):
    if "poison" in os.fspath(path) and not sys.argv[0].endswith("pspnet.py"):
        os.kill(os.getpid(), signal.SIGKILL)
    return opened(path, *args, **kwargs)


Image.open = open_or_die
'''


@pytest.mark.slow
def test_an_image_that_kills_every_worker_is_tried_three_times_then_reported(tmp_path, synthetic_model):
    """A worker process dies (SIGKILL, as the kernel's out-of-memory killer sends) on any image named
    'poison': a sitecustomize on the workers' module path wraps Pillow's Image.open."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(POISON_HOOK)
    weights = tmp_path / "small.h5"
    weights.symlink_to(synthetic_model("pspnet50_ade20k").converted_h5)
    released = models.RELEASED_MODELS["pspnet50_ade20k"]
    weights.with_suffix(".json").write_text(json.dumps({**released.description(), "crop_size": 41, "base_size": 48}))
    photos = tmp_path / "photos"
    save_image(photos / "good.png", smooth_image(30, 40, 1))
    save_image(photos / "poison.png", smooth_image(30, 40, 2))
    environment = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = start("pspnet.py", "-w", weights, "-g", photos / "*.png", "-o", tmp_path / "out", "-q",
                    "--ray", "--workers", "1", "--cpus-per-worker", "1", cwd=tmp_path, env=environment)
    code, stdout, stderr = finished(process)
    lines = stderr.splitlines()
    deaths = [line for line in lines if line.startswith("pspnet.py: warning: a worker (")]
    assert len(deaths) == ray_pool.MAX_ATTEMPTS
    assert all(f"died while on {photos / 'poison.png'}, attempt" in line for line in deaths)
    assert [line for line in lines if line not in deaths] == [
        f"pspnet.py: error: {photos / 'poison.png'}: left out, its worker died on each of 3 attempts"
    ]
    assert code == 1
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "good_probs.png", "good_seg.png", "good_seg_blended.png", "good_seg_read.png",
    ]


@pytest.mark.parametrize(
    "address, problem",
    [
        ("127.0.0.1:1", "[Errno 111] Connection refused"),
        ("ray://127.0.0.1:1", "[Errno 111] Connection refused"),  # Ray Client would retry for 30 s
        ("127.0.0.1:99999", "not HOST:PORT with a port 1-65535"),
        ("headnode", "not HOST:PORT with a port 1-65535"),
    ],
)
def test_a_ray_address_where_nothing_listens_is_one_line(tmp_path, address, problem):
    weights = write_classifier_only_weights(tmp_path / "mine.h5", 2)
    weights.with_suffix(".json").write_text(json.dumps(DESCRIPTION))
    image = save_image(tmp_path / "photo.png", smooth_image(30, 40, 3))
    code, stdout, stderr = finished(start("pspnet.py", "-w", weights, "-i", image, "-o", tmp_path / "out" / "a.png",
                                          "--ray", address, cwd=tmp_path))
    assert (code, stderr) == (1, f"pspnet.py: error: cannot join the Ray cluster at {address}: {problem}; give "
                                 "HOST:PORT of its head (ray start --head) or 'auto' on one of its machines\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_reader_of_stdout_that_goes_away_stops_pspnet_quietly(tmp_path, synthetic_model):
    """`pspnet.py -g ... | head -1`: the summary line meets a closed pipe; the run stops as SIGPIPE stops
    other programs (exit 141), without a traceback, the outputs written so far whole."""
    weights = tmp_path / "small.h5"
    weights.symlink_to(synthetic_model("pspnet50_ade20k").converted_h5)
    released = models.RELEASED_MODELS["pspnet50_ade20k"]
    weights.with_suffix(".json").write_text(json.dumps({**released.description(), "crop_size": 41, "base_size": 48}))
    for index in range(2):
        save_image(tmp_path / "photos" / f"p{index}.png", smooth_image(30, 40, index))
    process = start("pspnet.py", "-w", weights, "-g", tmp_path / "photos" / "*.png", "-o", tmp_path / "out",
                    cwd=tmp_path)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=DEADLINE_S) == 141
    assert "Traceback" not in stderr and "Error" not in stderr, stderr  # the progress bar's lines only
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "p0_probs.png", "p0_seg.png", "p0_seg_blended.png", "p0_seg_read.png",
    ]
