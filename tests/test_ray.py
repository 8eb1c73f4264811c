"""Tests of pspnet.py and evaluate.py on Ray (pspnet_keras/ray_pool.py): an embedded Ray of 2 CPUs shared by the module.

The network is the synthetic pspnet50_ade20k of conftest, described as a user model
with 137-pixel crops so that an image takes about a second on one core. The
single-process runs the Ray runs are compared with are `python pspnet.py` and
`python evaluate.py` as a user runs them, with one TensorFlow thread, as each of
the two workers has: TensorFlow's sums depend on its thread count, so a
probability may round to the neighbouring grey level with another count.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray

import evaluate
import pspnet
from helpers import error_lines
from helpers import output_files
from helpers import save_image
from helpers import smooth_image
from pspnet_keras import datasets
from pspnet_keras import models
from pspnet_keras import ray_pool
from pspnet_keras import scoring
from pspnet_keras import segmenter

# Ray Data's own use of its deprecated settings when it sends its context to the workers.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ADE20K = models.RELEASED_MODELS["pspnet50_ade20k"]
CROP_SIZE = 137
WORKER_FLAGS = ("--ray", "--workers", "2", "--cpus-per-worker", "1")
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1"}
KILL_WAIT_S = 300
PHOTOS = 6
# Classes painted into the evaluation labels; 200 is a value the folders layout does not define.
LABEL_CLASSES = (0, 3, 12, 255, 200)


@pytest.fixture(scope="module")
def ray_session():
    """One embedded Ray of 2 CPUs for the module, started as ray_pool starts one; the runs join it.
    The variables ray.init sets in this process's environment are taken out again afterwards."""
    environment = dict(os.environ)
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, runtime_env=ray_pool.worker_environment(),
        log_to_driver=False, logging_level="ERROR",
    )
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, synthetic_model):
    """The synthetic pspnet50_ade20k weights as a user model with 137-pixel crops (a link and its JSON)."""
    folder = tmp_path_factory.mktemp("model")
    link = folder / "small_crops.h5"
    link.symlink_to(synthetic_model("pspnet50_ade20k").converted_h5)
    description = {
        "format": "pspnet-keras", "version": 1, "depth": 50, "classes": ADE20K.classes,
        "crop_size": CROP_SIZE, "base_size": 144, "class_names": list(ADE20K.class_names),
        "palette": [list(colour) for colour in ADE20K.palette],
    }
    link.with_suffix(".json").write_text(json.dumps(description))
    return link


@pytest.fixture(autouse=True)
def restore_sigterm():
    """Puts back the SIGTERM handler the commands install."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def run_main(main, *args):
    """Runs a command's main in this process (joining the module's Ray); returns its exit code and output."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(arg) for arg in args])
    return SimpleNamespace(code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def run_single_process(script, *args):
    """Runs `python <script>` without Ray as a user would, with one TensorFlow thread; returns the process."""
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / script), *map(str, args)],
        capture_output=True, text=True, timeout=600, env={**environment, **ONE_THREAD},
    )


def is_ray_report(line):
    """Whether a line of stdout is one of Ray's own reports of a fault, which the driver prints as they come."""
    return "(raylet)" in line


def files_of(folder):
    """{name: bytes} of every file in `folder`, hidden ones included."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


def make_images(folder, count, broken=False):
    """Writes `count` small photographs of different sizes (and a file that is no image); returns the folder."""
    for index in range(count):
        save_image(folder / f"photo{index}.png", smooth_image(90 + 7 * index, 120 - 5 * index, index))
    if broken:
        (folder / "broken.png").write_bytes(b"not an image\n")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six photographs and a broken file."""
    return make_images(tmp_path_factory.mktemp("photos"), PHOTOS, broken=True)


@pytest.fixture(scope="module")
def single_process_outputs(tmp_path_factory, photos, weights):
    """The outputs of `pspnet.py -g` over the photographs without Ray, and its process."""
    out = tmp_path_factory.mktemp("single")
    result = run_single_process("pspnet.py", "-w", weights, "-g", photos / "*", "-o", out, "--save-probs", "-q")
    return SimpleNamespace(result=result, out=out)


# ---------------------------------------------------------------------------------------
# pspnet.py


@pytest.mark.slow
def test_ray_writes_what_the_single_process_run_writes(tmp_path, ray_session, photos, weights, single_process_outputs):
    single = single_process_outputs.result
    assert single.returncode == 1, single.stderr
    assert error_lines(single.stderr) == [f"pspnet.py: error: {photos / 'broken.png'}: neither an image Pillow can read nor a video PyAV can open"]

    result = run_main(pspnet.main, "-w", weights, "-g", photos / "*", "-o", tmp_path, "--save-probs", *WORKER_FLAGS)
    assert result.code == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("pspnet.py")] == [
        "pspnet.py: Ray on this machine (2 cores, no GPU): 2 workers of 1 CPU each, as --workers says; Keras on tensorflow",
        *error_lines(single.stderr),
    ]
    expected = files_of(single_process_outputs.out)
    assert sorted(expected) == sorted(
        path.name for index in range(PHOTOS) for path in output_files(f"photo{index}", ".png").values()
    )
    assert files_of(tmp_path) == expected
    summaries = sorted(line for line in result.stdout.splitlines() if not is_ray_report(line))
    assert [line.split(":")[0] for line in summaries] == [str(photos / f"photo{index}.png") for index in range(PHOTOS)]


def ray_worker_pids():
    """The process ids of this test's Ray workers running ImageWorker actors (descendants of this process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if b"ImageWorker" in (entry / "cmdline").read_bytes() and descends_from_this_process(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def descends_from_this_process(pid):
    """Whether process `pid` is a descendant of this test process."""
    while pid > 1:
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        if pid == os.getpid():
            return True
    return False


def kill_a_worker_once_an_image_is_done(out, killed):
    """Waits for the first written image, then kills one worker with SIGKILL; records what was written then."""
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        done = list(out.glob("*_seg_read.png"))
        pids = ray_worker_pids()
        if done and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.update(pid=pids[0], images_done=len(done))
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_every_image_written_once(
    tmp_path, ray_session, photos, weights, single_process_outputs
):
    killed = {}
    killer = threading.Thread(target=kill_a_worker_once_an_image_is_done, args=(tmp_path, killed))
    killer.start()
    result = run_main(pspnet.main, "-w", weights, "-g", photos / "*", "-o", tmp_path, "--save-probs", "-q",
                      *WORKER_FLAGS)
    killer.join()
    assert killed and killed["images_done"] < PHOTOS, "the worker was not killed while images were left"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    assert result.code == 1
    deaths = [line for line in result.stderr.splitlines() if line.startswith("pspnet.py: warning: a worker (")]
    assert len(deaths) <= 1  # the image the killed worker was on, when it was on one
    assert all(f"pid {killed['pid']}) died while on {photos}" in line for line in deaths)
    assert [line for line in result.stderr.splitlines() if line not in deaths] == error_lines(
        single_process_outputs.result.stderr
    )
    assert all(map(is_ray_report, result.stdout.splitlines()))  # Ray's own report of the death
    assert files_of(tmp_path) == files_of(single_process_outputs.out)


@pytest.mark.slow
def test_skip_existing_makes_no_forward_pass_when_every_output_exists(tmp_path, ray_session, photos, weights,
                                                                     single_process_outputs):
    for path in single_process_outputs.out.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    times = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}

    result = run_main(
        pspnet.main, "-w", weights, "-g", photos / "photo*.png", "-o", tmp_path, "--save-probs", "--skip-existing",
        *WORKER_FLAGS,
    )
    assert result.code == 0
    assert result.stderr == (
        f"pspnet.py: {PHOTOS} of {PHOTOS} images have all their outputs; segmenting 0 (--skip-existing)\n"
    )
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == times


class CountingNetwork:
    """Stands in for segmenter.PSPNet (what pspnet.py loads) without Ray: class 2 everywhere; counts its predictions."""

    predictions = []

    def __init__(self, model=None, weights=None, show_progress=True, precision="float32"):
        self.classes, self.class_names = model.classes, model.class_names
        self.palette = np.array(model.palette, np.uint8)

    def forward_count(self, height, width, sliding=False, flip=True, multi_scale=False):
        return 1

    def class_map(self, img, sliding=False, flip=True, multi_scale=False, progress=None, probabilities=None):
        CountingNetwork.predictions.append(img.shape)
        return np.full(img.shape[:2], 2, np.uint8), np.full(img.shape[:2], 0.5, np.float32)


def test_skip_existing_without_ray_predicts_only_images_missing_an_output(tmp_path, monkeypatch):
    monkeypatch.setattr(CountingNetwork, "predictions", [])
    monkeypatch.setattr(segmenter, "PSPNet", CountingNetwork)
    for index, size in enumerate(((20, 30), (24, 30), (28, 30))):
        save_image(tmp_path / "in" / f"p{index}.png", smooth_image(*size, index))
    first = run_main(pspnet.main, "-g", tmp_path / "in" / "*", "-o", tmp_path / "out", "-q")
    assert first.code == 0 and len(CountingNetwork.predictions) == 3
    (tmp_path / "out" / "p1_seg_blended.png").unlink()
    kept = (tmp_path / "out" / "p0_seg.png").stat().st_mtime_ns

    second = run_main(pspnet.main, "-g", tmp_path / "in" / "*", "-o", tmp_path / "out", "--skip-existing")
    assert second.code == 0
    assert CountingNetwork.predictions[3:] == [(24, 30, 3)]
    assert second.stderr.startswith("pspnet.py: 2 of 3 images have all their outputs; segmenting 1 (--skip-existing)\n")
    assert second.stdout.startswith(f"{tmp_path / 'in' / 'p1.png'}: ")
    assert (tmp_path / "out" / "p1_seg_blended.png").is_file()
    assert (tmp_path / "out" / "p0_seg.png").stat().st_mtime_ns == kept


# ---------------------------------------------------------------------------------------
# evaluate.py


def make_folders_set(root, count):
    """A folders-layout val set of `count` photographs with painted labels (one holding an undefined
    value), a broken image with its label, and ADE20K's class names."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in ADE20K.class_names))
    rng = np.random.default_rng(7)
    for index in range(count):
        height, width = 60 + 8 * index, 80
        save_image(root / "images" / "val" / f"s{index}.png", smooth_image(height, width, 20 + index))
        values = np.array(LABEL_CLASSES[: 4 if index else 5], np.uint8)
        label = values[rng.integers(0, len(values), (height // 4, width // 4))].repeat(4, 0).repeat(4, 1)
        save_image(root / "labels" / "val" / f"s{index}.png", label)
    (root / "images" / "val" / "torn.png").write_bytes(b"\x89PNG torn")
    save_image(root / "labels" / "val" / "torn.png", np.zeros((60, 80), np.uint8))
    return root


@pytest.mark.slow
def test_evaluate_on_ray_reports_what_the_single_process_run_reports_and_resumes(
    tmp_path, ray_session, weights
):
    data = make_folders_set(tmp_path / "data", 4)
    single_dir = tmp_path / "single"
    single = run_single_process(
        "evaluate.py", "-w", weights, "--data", data, "--save-dir", single_dir, "--report", tmp_path / "single.json"
    )
    assert single.returncode == 1, single.stderr  # torn.png is skipped
    expected = json.loads((tmp_path / "single.json").read_text())
    assert expected["images"] == 4 and [entry["file"] for entry in expected["skipped"]] == [
        str(data / "images" / "val" / "torn.png")
    ]
    assert [entry["file"] for entry in expected["undefined_label_values"]] == [str(data / "labels" / "val" / "s0.png")]

    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    for name in ("predictions.json", "s2.png"):
        (ray_dir / name).write_bytes((single_dir / name).read_bytes())
    kept = (ray_dir / "s2.png").stat()
    result = run_main(
        evaluate.main, "-w", weights, "--data", data, "--save-dir", ray_dir, "--report", tmp_path / "ray.json",
        *WORKER_FLAGS,
    )
    assert result.code == 1, result.stderr
    assert result.stderr.splitlines()[0] == (
        "evaluate.py: Ray on this machine (2 cores, no GPU): 2 workers of 1 CPU each, as --workers says; Keras on tensorflow"
    )
    assert sorted(line for line in result.stderr.splitlines() if line.startswith("evaluate.py: skipped")) == [
        line for line in single.stderr.splitlines() if line.startswith("evaluate.py: skipped")
    ]
    assert json.loads((tmp_path / "ray.json").read_text()) == expected
    assert files_of(ray_dir) == files_of(single_dir)
    assert (ray_dir / "s2.png").stat().st_mtime_ns == kept.st_mtime_ns
    assert f"report written to {tmp_path / 'ray.json'}" in result.stdout.splitlines()


def test_ray_sums_per_image_confusion_matrices_in_single_process_order(monkeypatch):
    tally = scoring.Tally(3, "evaluate.py")
    samples = [SimpleNamespace(image=Path(f"i{index}.png"), label=Path(f"l{index}.png")) for index in range(3)]
    monkeypatch.setattr(
        datasets, "undefined_values_problem", lambda sample, values: f"{sample.label} {values}"
    )
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        tally.add(samples[2], np.eye(3, dtype=np.int64), (9,), place=2)
        tally.skip(datasets.SampleError(Path("i1.png"), "torn"), place=1)
        tally.add(samples[0], 2 * np.eye(3, dtype=np.int64), (7,), place=0)
    np.testing.assert_array_equal(tally.confusion, 3 * np.eye(3))
    assert tally.images == 2
    assert tally.undefined_labels == [{"file": "l0.png", "values": [7]}, {"file": "l2.png", "values": [9]}]
    assert tally.skipped == [{"file": "i1.png", "problem": "torn"}]
    assert stderr.getvalue().splitlines() == [
        "evaluate.py: warning: l2.png (9,)", "evaluate.py: skipped i1.png: torn", "evaluate.py: warning: l0.png (7,)"
    ]


# ---------------------------------------------------------------------------------------
# Command lines and the pool, without Ray's workers


@pytest.mark.parametrize("main, prog, flags", [
    (pspnet.main, "pspnet.py", ("-i", "photo.png")),
    (evaluate.main, "evaluate.py", ("--data", "data")),
])
@pytest.mark.parametrize("option", [("--workers", "2"), ("--gpus-per-worker", "1"), ("--cpus-per-worker", "1")])
def test_pool_options_need_ray(main, prog, flags, option):
    with pytest.raises(SystemExit) as stop:
        run_main(main, *flags, *option)
    assert stop.value.code == 2


def test_missing_ray_is_one_line_naming_the_install_command(tmp_path, monkeypatch):
    save_image(tmp_path / "photo.png", smooth_image(20, 30, 1))
    (tmp_path / "weights.h5").write_bytes(b"never read without Ray")
    monkeypatch.setitem(sys.modules, "ray", None)
    result = run_main(
        pspnet.main, "-m", "pspnet50_ade20k", "-w", tmp_path / "weights.h5", "-i", tmp_path / "photo.png",
        "-o", tmp_path / "out.png", "--ray",
    )
    assert result.code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("pspnet.py: error: --ray needs Ray (")
    assert line.endswith("); install it with: python -m pip install -r requirements-ray.txt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png", "weights.h5"]


@pytest.mark.parametrize("nodes, flags, expected, room", [
    # One machine without GPU: workers of 4 cores, or of the cores --workers shares out.
    ([{"CPU": 16}], {}, ray_pool.Pool(4, 4, 0, "no GPU: one per 4 cores"), 4),
    ([{"CPU": 2}], {}, ray_pool.Pool(1, 2, 0, "no GPU: one per 2 cores"), 1),
    ([{"CPU": 2}], {"workers": 2}, ray_pool.Pool(2, 1, 0, "as --workers says"), 2),
    ([{"CPU": 2}], {"workers": 3}, ray_pool.Pool(3, 1, 0, "as --workers says"), 2),
    # GPUs: one worker per GPU with the CPUs beside it; halves of a GPU; CPU workers asked for.
    ([{"CPU": 16, "GPU": 4}, {"CPU": 8, "GPU": 1}], {}, ray_pool.Pool(5, 4, 1, "one per GPU"), 5),
    ([{"CPU": 8, "GPU": 2}], {"gpus_per_worker": 0.5}, ray_pool.Pool(4, 2, 0.5, "2 per GPU"), 4),
    ([{"CPU": 8, "GPU": 2}], {"gpus_per_worker": 0, "cpus_per_worker": 3},
     ray_pool.Pool(2, 3, 0, "CPU workers as --gpus-per-worker 0 says, one per 3 cores"), 2),
    # A head node that runs no work (ray start --head --num-cpus=0), tenths of a GPU, a GPU too few.
    ([{"CPU": 0}, {"CPU": 6}, {"CPU": 8}], {}, ray_pool.Pool(3, 4, 0, "no GPU: one per 4 cores"), 3),
    ([{"CPU": 20, "GPU": 1}], {"gpus_per_worker": 0.1}, ray_pool.Pool(10, 2, 0.1, "10 per GPU"), 10),
    ([{"CPU": 8, "GPU": 1}], {"gpus_per_worker": 2}, ray_pool.Pool(1, 1, 2, "one per 2 GPUs"), 0),
])
def test_pool_plan(nodes, flags, expected, room):
    assert ray_pool.plan_pool(nodes, **flags) == (expected, room)


def test_gpu_workers_need_a_gpu():
    with pytest.raises(ray_pool.RunError, match=r"^--gpus-per-worker 1: the Ray cluster has no GPU"):
        ray_pool.plan_pool([{"CPU": 8}], gpus_per_worker=1)


def test_temporaries_of_killed_workers_are_removed_and_nothing_else(tmp_path):
    names = [".a_seg.png.k2j4_x9z.tmp", ".a_seg.png.tmp", ".b_seg.png.abcdefgh.tmp", "a_seg.png", ".a_seg.png.x.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    ray_pool.remove_temporaries([tmp_path / "a_seg.png", tmp_path / "missing" / "c.png"])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(set(names) - {".a_seg.png.k2j4_x9z.tmp"})
