"""Peak memory and time of segmenting large photos, each case in a process of its own.

    python -m bench.memory [--cases ...] [--cityscapes] [--json FILE]
    python -m bench.memory --from-json FILE          # print the table of a saved run again

Each case runs `inference.Predictor.class_map`, which `pspnet.py` calls for every image,
on a synthetic photo-like image, in a fresh Python process with
TF_CPU_ALLOCATOR_USE_BFC=true as `pspnet.py` sets it. The network is
`layers_builder.build_pspnet(model)` with seeded random weights: its time and memory do
not depend on the weights' values, and its segmentations mean nothing, so none is kept.

A case reports the process's peak resident memory (VmHWM, and the parent's ru_maxrss of
that child from wait4), the wall time of class_map, the part of it spent in the band
loop (`inference.average_of_resized`), and the network's forward pass timed in the same
process (crop -> logits at crop size, as bench/benchmark.py times it; the median of two
calls before and two after class_map), so that overhead = class_map time - forward
passes x forward time. The same is reported in processor seconds of the process
(user + system, all threads), which other jobs on the machine inflate less than wall
time. The compiled crop function is traced before the timed call (once per process
in the CLI; reported as warm-up).

`--inference FILE` runs the cases with another version of inference.py (for example
`git show REV:inference.py > old.py`), to measure the code before a change; a version
without class_map is run as its CLI did: probability_map, then best_classes.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import measure

# pspnet.py's allocator (bench/README.md, "What made it fast"); set before TensorFlow loads.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
PROG = "bench/memory.py"

# name: (model, (height, width), protocol flags)
CASES = {
    "ade20k-12mp-default": ("pspnet50_ade20k", (3000, 4000), {"sliding": False, "multi_scale": False}),
    "ade20k-12mp-s-ms": ("pspnet50_ade20k", (3000, 4000), {"sliding": True, "multi_scale": True}),
    "ade20k-24mp-default": ("pspnet50_ade20k", (4000, 6000), {"sliding": False, "multi_scale": False}),
    # Small enough for code that holds the whole (H, W, 150) float32 map (1.8 GB here), for comparisons.
    "ade20k-3mp-default": ("pspnet50_ade20k", (1500, 2000), {"sliding": False, "multi_scale": False}),
    "cityscapes-2mp-s-ms": ("pspnet101_cityscapes", (1024, 2048), {"sliding": True, "multi_scale": True}),
}
DEFAULT_CASES = ("ade20k-12mp-default", "ade20k-12mp-s-ms", "ade20k-24mp-default")
# 154 forward passes of about 10 s on the 2-core machine: only with --cityscapes.
LONG_CASES = ("cityscapes-2mp-s-ms",)
WEIGHT_SEED = 7
IMAGE_SEED = 3
# The photo: a bicubic blow-up of a coarse random grid, flat rectangles, low-bit noise.
COARSE_GRID = (6, 8)
RECTANGLES = 12
NOISE_LEVELS = 16
NOISE_BAND_ROWS = 256
FORWARD_CALLS_EACH_SIDE = 2
STDERR_TAIL_CHARS = 2000


# --------------------------------------------------------------------------------------
# The child: one case in this process.


def load_inference(path):
    """The inference module: the project's, or the file at `path` standing in for it."""
    if path is None:
        from pspnet_keras import inference

        return inference
    spec = importlib.util.spec_from_file_location("inference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["inference"] = module
    spec.loader.exec_module(module)
    return module


def seeded_network(model_name, seed):
    """The model's Keras network with random weights: kernels N(0, 1/fan-in), 1-D weights |N(1, 0.2)|."""
    import numpy as np

    from layers_builder import build_pspnet

    model = build_pspnet(model_name)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([
                (np.abs(rng.normal(1.0, 0.2, w.shape)) if w.ndim == 1
                 else rng.normal(0.0, 1.0, w.shape) / np.sqrt(np.prod(w.shape[:-1]))).astype(np.float32)
                for w in weights
            ])
    return model


def synthetic_photo(height, width, seed):
    """A photo-like uint8 RGB image: smooth colour fields, flat rectangles with edges, fine noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, COARSE_GRID + (3,), dtype=np.uint8))
    image = np.array(coarse.resize((width, height), Image.BICUBIC))
    for _ in range(RECTANGLES):
        top, left = rng.integers(0, height), rng.integers(0, width)
        image[top : top + height // 6, left : left + width // 6] = rng.integers(0, 256, 3)
    for top in range(0, height, NOISE_BAND_ROWS):
        rows = image[top : top + NOISE_BAND_ROWS]
        rows ^= rng.integers(0, NOISE_LEVELS, rows.shape, dtype=np.uint8)
    return image


def timed(function):
    """(function, seconds of each call): `function` wrapped to record how long each call takes."""
    seconds = []

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return wrapper, seconds


def segment(inference, predictor, image, protocol):
    """What pspnet.py computes for an image: the best class and its probability at every pixel."""
    if hasattr(predictor, "class_map"):
        return predictor.class_map(image, **protocol)
    return inference.best_classes(predictor.probability_map(image, **protocol))


def run_case(name, inference_path):
    """Runs case `name` in this process; returns its measurements."""
    import numpy as np
    import tensorflow as tf

    from layers_builder import split_upsampling
    from pspnet_keras import models

    inference = load_inference(inference_path)
    model_name, (height, width), flags = CASES[name]
    config = models.RELEASED_MODELS[model_name]
    crop_size = config.crop_size
    protocol = dict(flags, flip=True)
    start = time.perf_counter()
    model = seeded_network(model_name, WEIGHT_SEED)
    logits, upsampling = split_upsampling(model)
    predictor = inference.Predictor(logits, crop_size, config.base_size, upsampling)
    image = synthetic_photo(height, width, IMAGE_SEED)
    build_s = time.perf_counter() - start

    crop = tf.constant(inference.preprocess(image[:crop_size, :crop_size])[np.newaxis])
    network = tf.function(lambda batch: model(batch, training=False), input_signature=[tf.TensorSpec(crop.shape)])
    start = time.perf_counter()
    network(crop).numpy()
    np.asarray(predictor.crop_function(True)(np.asarray(crop[0]), crop_size, crop_size))
    warmup_s = time.perf_counter() - start

    def forward_seconds():
        start, start_cpu = time.perf_counter(), time.process_time()
        network(crop).numpy()
        return time.perf_counter() - start, time.process_time() - start_cpu

    forward = [forward_seconds() for _ in range(FORWARD_CALLS_EACH_SIDE)]
    bands_s = None
    if hasattr(inference, "average_of_resized"):
        inference.average_of_resized, band_calls = timed(inference.average_of_resized)
    start, start_cpu = time.perf_counter(), time.process_time()
    class_ids, best = segment(inference, predictor, image, protocol)
    class_map_s, class_map_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    if hasattr(inference, "average_of_resized"):
        bands_s = sum(band_calls)
    forward += [forward_seconds() for _ in range(FORWARD_CALLS_EACH_SIDE)]
    assert class_ids.shape == best.shape == (height, width)
    passes = predictor.forward_count(height, width, **protocol)
    forward_s = statistics.median(wall for wall, _ in forward)
    forward_cpu_s = statistics.median(cpu for _, cpu in forward)
    return {
        "case": name,
        "model": model_name,
        "image_size": [width, height],
        "flags": flag_text(flags),
        "forward_passes": passes,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "forward_calls_s": [wall for wall, _ in forward],
        "forward_s": forward_s,
        "class_map_s": class_map_s,
        "bands_s": bands_s,
        "passes_x_forward_s": passes * forward_s,
        "overhead_s": class_map_s - passes * forward_s,
        "forward_cpu_s": forward_cpu_s,
        "class_map_cpu_s": class_map_cpu_s,
        "overhead_cpu_s": class_map_cpu_s - passes * forward_cpu_s,
        "peak_rss_mib": measure.peak_rss_mib(),
    }


def flag_text(flags):
    """The command-line flags of a protocol (flip is on in every case)."""
    text = " ".join(flag for flag, on in (("-s", flags["sliding"]), ("-ms", flags["multi_scale"])) if on)
    return text or "(default)"


# --------------------------------------------------------------------------------------
# The parent: each case in a child process.


def run_child(name, inference_path, work_dir):
    """Runs case `name` in a child process; returns its measurements with its exit code and ru_maxrss."""
    command = [sys.executable, "-m", "bench.memory", "--child", name]
    if inference_path:
        command += ["--inference", str(inference_path)]
    environment = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2")
    stdout_path, stderr_path = Path(work_dir) / f"{name}.json", Path(work_dir) / f"{name}.stderr"
    start = time.perf_counter()
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=environment, cwd=PROJECT_ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    model_name, (height, width), flags = CASES[name]
    result = {
        "case": name,
        "inference": str(inference_path or "inference.py"),
        "model": model_name,
        "image_size": [width, height],
        "flags": flag_text(flags),
    }
    if process.returncode == 0:
        result.update(json.loads(stdout_path.read_text()))
    else:
        result["stderr_tail"] = stderr_path.read_text()[-STDERR_TAIL_CHARS:]
    result.update(
        exit_code=process.returncode,
        process_wall_s=time.perf_counter() - start,
        ru_maxrss_mib=usage.ru_maxrss / measure.KIB,
        loadavg_after=os.getloadavg(),
    )
    return result


def seconds(value):
    """A duration cell, or a dash when there is none."""
    return "-" if value is None else f"{value:.2f}"


def report_text(results):
    """The results as a Markdown table."""
    header = [
        "case", "model", "image", "flags", "exit", "peak RSS MiB", "passes", "forward s", "class_map s",
        "passes x forward s", "overhead s", "band loop s", "overhead CPU s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for result in results["cases"]:
        width, height = result["image_size"]
        inference = result.get("inference", "inference.py")
        case = result["case"] + ("" if inference == "inference.py" else f" ({inference})")
        cells = [
            case, result["model"], f"{width}x{height}", result["flags"], str(result["exit_code"]),
            f"{result.get('peak_rss_mib', result['ru_maxrss_mib']):.0f}", str(result.get("forward_passes", "-")),
            seconds(result.get("forward_s")), seconds(result.get("class_map_s")),
            seconds(result.get("passes_x_forward_s")), seconds(result.get("overhead_s")),
            seconds(result.get("bands_s")), seconds(result.get("overhead_cpu_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def argument_parser():
    """The benchmark's options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", nargs="+", choices=tuple(CASES), default=list(DEFAULT_CASES),
        help="cases to run (default: %(default)s)",
    )
    parser.add_argument("--cityscapes", action="store_true", help=f"also run {', '.join(LONG_CASES)} (about 30 min)")
    parser.add_argument("--inference", type=Path, help="run with this file as inference.py")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--from-json", type=Path, help="print the table of a saved run and exit")
    parser.add_argument("--child", choices=tuple(CASES), help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    """Runs the benchmark (or, with --child, one case in this process)."""
    args = argument_parser().parse_args(argv)
    import utils

    if args.child:
        print(json.dumps(run_case(args.child, args.inference)))
        return 0
    if args.from_json:
        print(report_text(json.loads(args.from_json.read_text())))
        return 0
    cases = list(args.cases) + [case for case in LONG_CASES if args.cityscapes and case not in args.cases]
    results = {"machine": measure.machine_info(("tensorflow", "keras", "numpy", "pillow")), "inference": str(args.inference or "inference.py"), "cases": []}
    with tempfile.TemporaryDirectory(prefix="pspnet-memory-") as work_dir:
        for name in cases:
            print(f"{PROG}: {name} ...", file=sys.stderr, flush=True)
            results["cases"].append(run_child(name, args.inference, work_dir))
            if args.json:
                utils.write_json_atomic(args.json, results)
    print(report_text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
