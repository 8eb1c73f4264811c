"""Speed of export.py's ONNX file in ONNX Runtime against this project's TensorFlow path.

    python -m bench.export_bench [--models ...] [--runs N] [--warmup N] [--threads N] [--decomposed-einsum]

For each model at its crop size: the Keras network with seeded weights (Keras'
initialisers under keras.utils.set_random_seed: dense float32 arithmetic, so the
values do not change the time), written as ONNX by pspnet_keras.export.transaction.export
in a child process (which checks the file against the network), then these calls on the same crop in
this process, taken in turns so that a machine that speeds up or slows down affects
all of them alike, each with --threads threads:

- ours: the Keras network compiled with tf.function, crop -> logits read back to
  NumPy (the call inference.Predictor makes), TensorFlow with --threads intra-op threads;
- onnxruntime: the exported file in ONNX Runtime, CPU, fp32, ORT_ENABLE_ALL,
  --threads intra-op threads, sequential execution;
- onnxruntime_decomposed (--decomposed-einsum): the same export with tf2onnx's einsum
  optimizer, which export.py leaves out, decomposing conv5_4's Einsums into
  Transpose/Reshape/MatMul.

Prints the medians, the ratios to ours, and each ONNX file's agreement with the network.
"""

import argparse
import importlib.metadata
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pspnet_keras import runtime

tf = runtime.import_tensorflow()

import keras

import layers_builder
from bench import measure
from pspnet_keras import models
from pspnet_keras.export import runtimes
from pspnet_keras.export import transaction
from pspnet_keras.export import writers
from pspnet_keras.export.formats import DEFAULT_OPSET
from pspnet_keras.export.formats import INPUT_NAME
from pspnet_keras.export.formats import LOGITS

PROG = "bench/export_bench.py"
WEIGHT_SEED = 2017
PACKAGES = ("tensorflow", "keras", "numpy", "tf2onnx", "onnx", "onnxruntime")
LABELS = {
    "ours": "ours: Keras network, tf.function",
    "onnxruntime": "export.py ONNX in ONNX Runtime",
    "onnxruntime_decomposed": "same, tf2onnx's einsum optimizer on",
}


class BenchError(Exception):
    """A measurement that could not be made; the message says which."""


def seeded_weights(config, path):
    """Writes the Keras network of `config` with Keras' initial weights under a fixed seed to `path` (.h5)."""
    keras.utils.set_random_seed(WEIGHT_SEED)
    layers_builder.save_weights(layers_builder.build_pspnet(config), path)


def write_onnx_file(model_name, weights, path, decomposed):
    """Seconds to write and check one ONNX file of the model with `weights`, in a process of its own.

    export.py's file (transaction.export), or with `decomposed` the same writer with no
    tf2onnx optimizer left out, checked the same way. A conversion holds several
    copies of the weights (10 to 13 GiB at its peak for pspnet50_ade20k), which a
    process of its own gives back.
    """
    config = models.RELEASED_MODELS[model_name]
    network = layers_builder.build_pspnet(config)
    layers_builder.load_weights(network, weights)
    started = time.perf_counter()
    if decomposed:
        writers.write_onnx(network, config, path, DEFAULT_OPSET, skipped_optimizers=())
        runtimes.check_export(network, config, "onnx", path)
    else:
        transaction.export(network, config, "onnx", path)
    return time.perf_counter() - started


def onnx_files(model_name, weights, directory, decomposed):
    """({name: path}, {name: export seconds}) of the ONNX files to time, each written by a child process."""
    variants = {"onnxruntime": False, "onnxruntime_decomposed": True} if decomposed else {"onnxruntime": False}
    files = {name: Path(directory) / f"{model_name}_{name}.onnx" for name in variants}
    seconds = {}
    context = multiprocessing.get_context("spawn")
    for name, variant in variants.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as child:
            try:
                seconds[name] = child.submit(write_onnx_file, model_name, weights, files[name], variant).result()
            except BrokenProcessPool:
                raise BenchError(f"{model_name}: the process writing {LABELS[name]!r} died (out of memory?)") from None
    return files, seconds


def measure_model(model_name, args, directory):
    """Timings, ratios and agreement of one model's calls."""
    config = models.RELEASED_MODELS[model_name]
    weights = Path(directory) / f"{model_name}.h5"
    seeded_weights(config, weights)
    files, export_s = onnx_files(model_name, weights, directory, args.decomposed_einsum)
    network = layers_builder.build_pspnet(config)
    layers_builder.load_weights(network, weights)
    crop = runtimes.check_crops(network, config)
    compiled = tf.function(lambda batch: network(batch, training=False))
    calls = {"ours": lambda: compiled(crop).numpy()}
    for name, path in files.items():
        session = measure.onnxruntime_session(path, args.threads)
        calls[name] = lambda session=session: session.run([LOGITS], {INPUT_NAME: crop})[0]
    reference = calls["ours"]()
    agreement = {name: runtimes.agreement(reference, calls[name]()) for name in files}
    times = measure.seconds_in_turns(calls, args.warmup, args.runs)
    medians = {name: statistics.median(spent) for name, spent in times.items()}
    return {
        "model": model_name,
        "crop_size": config.crop_size,
        "export_s": export_s,
        "times": times,
        "medians": medians,
        "ratios": {name: medians[name] / medians["ours"] for name in calls},
        "agreement": agreement,
    }


def cpu_name():
    """The processor's model name (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def machine_line(args):
    """The machine, the packages, the threads and the load average."""
    cpu = cpu_name()
    packages = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in PACKAGES)
    load = "/".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {args.threads} threads; {packages}; load average {load}"


def report(results, args):
    """The Markdown table of the results, with the machine line and each file's agreement."""
    lines = [
        machine_line(args),
        f"median of {args.runs} calls after {args.warmup} warm-up, taken in turns",
        "",
        "| model (crop) | runtime | median s | ÷ ours | all timed calls, s | vs the network's logits |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, median in result["medians"].items():
            spent = " ".join(f"{value:.2f}" for value in result["times"][name])
            if name in result["agreement"]:
                delta, agreeing = result["agreement"][name]
                parity = f"max abs diff {delta:.1e} of range, argmax {agreeing:.3%}"
            else:
                parity = "reference"
            lines.append(
                f"| {result['model']} ({result['crop_size']}) | {LABELS[name]} | {median:.3f} | "
                f"{result['ratios'][name]:.2f} | {spent} | {parity} |"
            )
        exports = ", ".join(f"{LABELS[name]} {seconds:.0f} s" for name, seconds in result["export_s"].items())
        lines.append(f"{result['model']}: ONNX export and check: {exports}")
    return "\n".join(lines)


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=models.RELEASED_MODEL_NAMES, default=[models.DEFAULT_MODEL],
                        metavar="MODEL", help=f"models to measure (default: {models.DEFAULT_MODEL})")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per runtime (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per runtime first (default: 1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads of TensorFlow and ONNX Runtime alike (default: 2)")
    parser.add_argument("--decomposed-einsum", action="store_true",
                        help="also time the export with tf2onnx's einsum optimizer (minutes more per model)")
    return parser


def main(argv=None):
    """Runs the benchmark and prints its report; returns the exit status."""
    args = argument_parser().parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        argument_parser().error("--runs and --threads must be at least 1, --warmup at least 0")
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="pspnet-export-bench-") as directory:
            results = [measure_model(model_name, args, directory) for model_name in args.models]
    except BenchError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
