"""The Keras backends side by side on this CPU: TensorFlow, JAX and PyTorch against ONNX Runtime, in turns.

    python -m bench.backends [--rounds 3] [--calls 2] [--out bench/results] [--crop S | --dry-run]
    python -m bench.backends --from-json FILE        # print the tables of a saved run again

A process has one Keras backend, so every measurement runs in a process of its own,
each backend's started with KERAS_BACKEND set (keras.io, "Configuring your backend").
The work is done in rounds; each round gives every runtime its turn once, in an order
rotated from round to round, so that a machine whose speed drifts (shared cores)
slows all of them alike. A runtime's turn in a round is:

1. a measuring process (this script with --child) that times, in process, the CLI's
   start-up steps: importing Keras and its backend (runtime.import_keras), importing
   the project's modules, building the network and loading its weights
   (segmenter.PSPNet, as pspnet.py does), the first call of the CLI's crop function
   (`Predictor.crop_function(False)`: tracing / compiling, plus one pass) and later
   calls of it; then the network compiled by `backend.compile_network(model, (1, S, S, 3))`,
   crop -> logits read back to NumPy (`backend.to_numpy`), --calls times in turns with
   the crop function. ONNX Runtime's process times the same steps for its peer graph,
   built from the Caffe deploy prototxt by bench/onnx_from_caffe.py (import,
   session, first run, later runs);
2. for a Keras backend, the command `pspnet.py -w H5 -i PHOTO -o OUT --no-flip -q
   --backend B` (one forward pass), its wall time, and a bare `python -c "import keras"`
   on the same backend, so that "whole run minus a bare import" can be read off.

The weights, the peer graph and OpenCV's logits are made first, by a --prepare process.
Peak resident memory is recorded for every process: a measuring process's own (VmHWM),
the CLI's and the bare import's ru_maxrss. The first round's logits of every runtime
for one input are compared with OpenCV's dnn running the same prototxt
(bench/synthetic_caffe.py) and with ONNX Runtime's, so that all compute the same net.
Weights are the seeded synthetic ones of bench/synthetic_caffe.py converted by
weight_converter.py: the speed does not depend on their values, and no output here is
a segmentation result.

Reported per runtime: p50 and p90 of the timed calls over all rounds, the median over
rounds of each round's ratio to ONNX Runtime's median in that round, the start-up
steps, the CLI and bare-import times. The results file,
backends_<model>_<cpu kind>.json (bench/measure.py's kind: widest vector instructions
and usable cores; _crop<S> added for another crop size), records the CPU flags, the
cores, the package versions and the date. --dry-run is the same at crop 41 (a user
model of the same layers and weights), seconds per step, for the tests.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from datetime import timezone
from pathlib import Path

import numpy as np

from bench import measure
from pspnet_keras import runtime

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/backends.py"
MODEL = "pspnet50_ade20k"
PEER = "onnxruntime"
RUNTIMES = (*runtime.BACKENDS, PEER)
RUNTIME_TITLES = {**runtime.BACKEND_TITLES, PEER: "ONNX Runtime"}
CALLS = 2
DRY_RUN_CROP = 41
DRY_RUN_CALLS = 1
# The longer side of the sliding-window protocol for a crop of side S: not used without -s.
BASE_SIZE_MARGIN = 7
INPUT_SEED = 1
PHOTO = PROJECT_ROOT / "example_images" / "rocket.jpg"
PACKAGES = (
    "keras", "tensorflow", "jax", "jaxlib", "torch", "numpy", "onnx", "onnxruntime", "opencv-python-headless",
    "h5py", "pillow",
)
# /proc/cpuinfo flags that decide float32 and bfloat16 convolution speed on x86.
# The start-up steps of one process, in the order they happen, and their table labels.
STARTUP_STEPS = {
    "import_s": "import Keras + backend (ORT: onnxruntime)",
    "import_project_s": "import project",
    "build_load_s": "build + load (ORT: session)",
    "first_call_s": "first call (trace / compile)",
    "forward_s": "later call",
}
# What the --prepare process writes beside the weights: the list of inputs, OpenCV's logits.
INPUTS_FILE = "inputs.json"
REFERENCE_FILE = "opencv_logits.npy"
STDERR_TAIL_CHARS = 2000


# --------------------------------------------------------------------------------------
# Measuring processes (--child)


def seconds(call):
    """(seconds, result) of one call of `call`."""
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def keras_child(args):
    """The start-up steps, the CLI's crop function and the compiled network, timed in this process.

    Runs on the backend `args.child`; the network is the one `pspnet.py -w args.h5` builds.
    """
    import_s, _ = seconds(lambda: import_keras_on(args.child))
    import_project_s, _ = seconds(import_project)
    from pspnet_keras import backend
    from pspnet_keras import models
    from pspnet_keras.segmenter import PSPNet

    config = models.resolve_model(None, args.h5)
    build_load_s, net = seconds(lambda: PSPNet(config, weights=args.h5, show_progress=False))
    side = net.crop_size
    crop = synthetic_crop(side)
    crop_function = net.predictor.crop_function(False)
    crop_first_call_s, _ = seconds(lambda: crop_function(crop, side, side))
    network = backend.compile_network(net.model, (1, side, side, 3))
    network_first_call_s, logits = seconds(lambda: backend.to_numpy(network(crop[np.newaxis])))
    calls = {
        "forward": lambda: backend.to_numpy(network(crop[np.newaxis])),
        "crop_call": lambda: crop_function(crop, side, side),
    }
    times = measure.seconds_in_turns(calls, 0, args.calls)
    return logits[0], {
        "framework": backend.framework_version(),
        "threads": keras_threads(args.child),
        "import_s": import_s,
        "import_project_s": import_project_s,
        "build_load_s": build_load_s,
        "crop_first_call_s": crop_first_call_s,
        "network_first_call_s": network_first_call_s,
        "forward_times_s": times["forward"],
        "crop_call_times_s": times["crop_call"],
    }


def import_keras_on(name):
    """Imports Keras on the backend `name` as the commands do (runtime.configure, runtime.import_keras)."""
    runtime.configure(backend=name)
    runtime.import_keras()


def import_project():
    """Imports the modules pspnet.py needs to build and run a network (after Keras)."""
    import layers_builder  # noqa: F401
    from pspnet_keras import inference  # noqa: F401
    from pspnet_keras import segmenter  # noqa: F401


def keras_threads(name):
    """The CPU threads the backend `name` computes with, as a short text."""
    if name == "tensorflow":
        inter_op, intra_op = runtime.thread_pool_sizes()
        return f"inter-op {inter_op}, intra-op {intra_op}"
    if name == "torch":
        import torch

        return f"intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}"
    return f"XLA's default, {runtime.usable_cores()} cores usable"


def onnxruntime_child(args):
    """ONNX Runtime's start-up steps and forward passes of the peer graph `args.onnx`, timed in this process."""
    import_s, onnxruntime = seconds(lambda: __import__("onnxruntime"))
    cores = runtime.usable_cores()
    build_load_s, session = seconds(lambda: measure.onnxruntime_session(args.onnx, cores))
    side = session.get_inputs()[0].shape[-1]
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(synthetic_crop(side)[np.newaxis].transpose(0, 3, 1, 2))}
    first_call_s, logits = seconds(lambda: session.run(None, feed)[0])
    times = measure.seconds_in_turns({"forward": lambda: session.run(None, feed)[0]}, 0, args.calls)
    return logits[0].transpose(1, 2, 0), {
        "framework": f"ONNX Runtime {onnxruntime.__version__}",
        "threads": f"intra-op {cores}, inter-op 1",
        "settings": "CPUExecutionProvider, fp32, ORT_ENABLE_ALL, sequential (measure.onnxruntime_session)",
        "import_s": import_s,
        "import_project_s": None,
        "build_load_s": build_load_s,
        "crop_first_call_s": first_call_s,
        "network_first_call_s": first_call_s,
        "forward_times_s": times["forward"],
        "crop_call_times_s": times["forward"],
    }


def synthetic_crop(side):
    """The benchmark's input: one (side, side, 3) float32 BGR mean-subtracted crop, seeded."""
    from bench.synthetic_caffe import synthetic_image

    return synthetic_image(side, INPUT_SEED)[0]


def child(args):
    """Measures one runtime in this process and writes its figures (JSON) to args.result; with
    args.logits, also its logits (.npy) and their agreement with OpenCV's (args.reference)."""
    measure_runtime = onnxruntime_child if args.child == PEER else keras_child
    logits, figures = measure_runtime(args)
    figures["peak_rss_mib"] = measure.peak_rss_mib()
    if args.logits is not None:
        np.save(args.logits, logits)
        figures["logits_vs_opencv"] = measure.logit_agreement(logits, np.load(args.reference))
    args.result.write_text(json.dumps(figures))


def prepare(args):
    """Writes the rounds' inputs into the folder args.prepare (prepared_files) and lists them in its INPUTS_FILE."""
    folder = args.prepare
    files, reference = prepared_files(model_config(args.crop), folder)
    files["reference"] = folder / REFERENCE_FILE
    np.save(files["reference"], reference)
    (folder / INPUTS_FILE).write_text(json.dumps({kind: str(path) for kind, path in files.items()}))


# --------------------------------------------------------------------------------------
# The rounds (parent)


class Process:
    """A finished child process: exit code, wall seconds, peak resident MiB and the end of its stderr.

    The peak is the child's ru_maxrss, which on Linux also counts what the parent held when
    the child was started (the high-water mark of the forked image is kept over exec): the
    parent holds no network or large array while it starts the processes it measures.
    """

    def __init__(self, command, environment, work_dir):
        stderr_path = Path(work_dir) / "stderr.txt"
        start = time.perf_counter()
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, env=environment, cwd=PROJECT_ROOT
            )
            _, status, usage = os.wait4(process.pid, 0)
        self.wall_s = time.perf_counter() - start
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.peak_rss_mib = usage.ru_maxrss / measure.KIB
        self.stderr_tail = stderr_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]

    def check(self, what):
        """Stops the benchmark with the end of the process's stderr when it failed."""
        if self.exit_code:
            raise SystemExit(f"{PROG}: {what} failed with exit code {self.exit_code}:\n{self.stderr_tail}")


def environment_of(name):
    """This process's environment for a child on runtime `name`: KERAS_BACKEND set for a Keras backend."""
    environment = {key: value for key, value in os.environ.items() if key != runtime.KERAS_BACKEND_VARIABLE}
    if name != PEER:
        environment[runtime.KERAS_BACKEND_VARIABLE] = name
    return environment


def prepared_inputs(args, work_dir):
    """{kind: path} of the rounds' inputs, made by a --prepare process (so that this one stays small)."""
    command = [sys.executable, "-m", "bench.backends", "--prepare", str(work_dir), "--crop", str(args.crop)]
    process = Process(command, os.environ, work_dir)
    process.check("preparing the weights, the ONNX graph and OpenCV's logits")
    return {kind: Path(path) for kind, path in json.loads((Path(work_dir) / INPUTS_FILE).read_text()).items()}


def logits_path(work_dir, name):
    """Where the measuring process of runtime `name` writes its logits in the first round."""
    return Path(work_dir) / f"{name}_logits.npy"


def measuring_process(name, files, check_logits, args, work_dir):
    """Runs the --child process of runtime `name`: its figures and wall time; with `check_logits`,
    it also writes its logits and compares them with OpenCV's."""
    result_path = Path(work_dir) / f"{name}.json"
    command = [
        sys.executable, "-m", "bench.backends", "--child", name, "--h5", str(files["h5"]),
        "--onnx", str(files["onnx"]), "--calls", str(args.calls), "--result", str(result_path),
    ]
    if check_logits:
        command += ["--logits", str(logits_path(work_dir, name)), "--reference", str(files["reference"])]
    process = Process(command, environment_of(name), work_dir)
    process.check(f"the measuring process on {name}")
    figures = json.loads(result_path.read_text())
    result_path.unlink()
    return figures | {"process_wall_s": process.wall_s}


def cli_run(name, files, work_dir):
    """`pspnet.py --no-flip` on the photo with --backend `name`, and a bare `import keras` on it: seconds, MiB."""
    from pspnet_keras.segment import output_paths

    stem = Path(work_dir) / "cli" / name
    command = [
        sys.executable, str(PROJECT_ROOT / "pspnet.py"), "-w", str(files["h5"]), "-i", str(PHOTO),
        "-o", f"{stem}.png", "--no-flip", "-q", "--backend", name,
    ]
    cli = Process(command, environment_of(name), work_dir)
    cli.check(f"pspnet.py --backend {name}")
    for output in output_paths(stem, ".png", save_probs=False).values():
        if not output.is_file():
            raise SystemExit(f"{PROG}: pspnet.py --backend {name} exited 0 but wrote no {output}")
        output.unlink()
    bare = Process([sys.executable, "-c", "import keras"], environment_of(name), work_dir)
    bare.check(f"import keras on {name}")
    return {
        "cli_wall_s": cli.wall_s,
        "cli_peak_rss_mib": cli.peak_rss_mib,
        "bare_import_s": bare.wall_s,
        "bare_import_peak_rss_mib": bare.peak_rss_mib,
    }


def rotated(names, round_number):
    """`names` rotated left by `round_number` places: each runtime goes first in turn."""
    shift = round_number % len(names)
    return list(names[shift:]) + list(names[:shift])


def run_rounds(files, args, work_dir):
    """Every round's figures of every runtime: ([{runtime: figures}], [order of each round])."""
    rounds, orders = [], []
    for round_number in range(args.rounds):
        order = rotated(RUNTIMES, round_number)
        figures = {}
        for name in order:
            measure.progress(PROG, f"round {round_number + 1}/{args.rounds}: {name}")
            figures[name] = measuring_process(name, files, round_number == 0, args, work_dir)
            if name != PEER:
                figures[name] |= cli_run(name, files, work_dir)
        rounds.append(figures)
        orders.append(order)
    return rounds, orders


# --------------------------------------------------------------------------------------
# Inputs: weights, the peer graph, the reference logits


def model_config(crop_size):
    """The ModelConfig measured: the released model, or the same layers at another crop size."""
    from pspnet_keras import models

    released = models.RELEASED_MODELS[MODEL]
    if crop_size == released.crop_size:
        return released
    return dataclasses.replace(
        released, name=f"{MODEL}_crop{crop_size}", crop_size=crop_size, base_size=crop_size + BASE_SIZE_MARGIN
    )


def prepared_files(config, work_dir):
    """The weights (.h5), the peer graph (.onnx) and OpenCV's logits of the benchmark's input.

    The .h5 is weight_converter.py's conversion of the seeded synthetic Caffe weights; for
    another crop size it is linked with a user model's description beside it, so that
    `pspnet.py -w` builds that model.
    """
    from bench.onnx_from_caffe import build_onnx_net
    from bench.synthetic_caffe import SyntheticModel
    from bench.synthetic_caffe import opencv_logits
    from bench.synthetic_caffe import opencv_net
    from pspnet_keras import caffe_net
    from pspnet_keras import models

    synthetic = SyntheticModel(MODEL, work_dir)
    h5, prototxt = synthetic.converted_h5, synthetic.prototxt
    if not config.released:
        h5 = Path(work_dir) / f"{config.name}.h5"
        h5.symlink_to(synthetic.converted_h5)
        models.description_path(h5).write_text(json.dumps(config.description()))
        prototxt = Path(work_dir) / f"{config.name}.prototxt"
        prototxt.write_text(caffe_net.deploy_prototxt(config))
    onnx_path = Path(work_dir) / f"{config.name}.onnx"
    onnx_path.write_bytes(build_onnx_net(prototxt, synthetic.weights).model.SerializeToString())
    image = synthetic_crop(config.crop_size)[np.newaxis]
    reference = opencv_logits(opencv_net(prototxt, synthetic.weights), image)
    return {"h5": h5, "onnx": onnx_path}, reference


def agreements(first_round, work_dir):
    """Each runtime's first-round logits against OpenCV's (measured in its process) and against ONNX Runtime's."""
    peer = np.load(logits_path(work_dir, PEER))
    return {
        name: {
            "vs_opencv": first_round[name]["logits_vs_opencv"],
            "vs_onnxruntime": measure.logit_agreement(np.load(logits_path(work_dir, name)), peer),
        }
        for name in RUNTIMES
    }


# --------------------------------------------------------------------------------------
# Summary


def call_summary(rounds, name, key):
    """The spread of runtime `name`'s calls `key` (lists of seconds) over all rounds, each round's median
    divided by ONNX Runtime's forward median in that round, and the median of those ratios."""
    times = [seconds for figures in rounds for seconds in figures[name][key]]
    ratios = [
        statistics.median(figures[name][key]) / statistics.median(figures[PEER]["forward_times_s"])
        for figures in rounds
    ]
    return measure.spread(times) | {
        "ratio_to_onnxruntime_per_round": ratios, "ratio_to_onnxruntime": statistics.median(ratios),
    }


def startup_summary(per_round):
    """The start-up steps (STARTUP_STEPS) of each round's measuring process and their medians; the first
    call is the first crop-function call less the median of the later ones."""
    later_calls = [statistics.median(figures["crop_call_times_s"]) for figures in per_round]
    steps = {
        "import_s": [figures["import_s"] for figures in per_round],
        "import_project_s": [figures["import_project_s"] for figures in per_round],
        "build_load_s": [figures["build_load_s"] for figures in per_round],
        "first_call_s": [figures["crop_first_call_s"] - later for figures, later in zip(per_round, later_calls)],
        "forward_s": later_calls,
    }
    return {
        step: {"per_round_s": values, "p50_s": statistics.median(values)}
        for step, values in steps.items()
        if None not in values
    }


def runtime_summary(rounds, name):
    """One runtime's figures over all rounds: its calls and their ratios to ONNX Runtime, start-up, CLI."""
    per_round = [figures[name] for figures in rounds]
    summary = {
        "framework": per_round[0]["framework"],
        "threads": per_round[0]["threads"],
        "forward": call_summary(rounds, name, "forward_times_s"),
        "crop_call": call_summary(rounds, name, "crop_call_times_s"),
        "startup": startup_summary(per_round),
        "network_first_call_s": [figures["network_first_call_s"] for figures in per_round],
        "measuring_process_peak_rss_mib": max(figures["peak_rss_mib"] for figures in per_round),
        "measuring_process_wall_s": [figures["process_wall_s"] for figures in per_round],
        "rounds": per_round,
    }
    if name != PEER:
        summary["cli_noflip"] = cli_summary(rounds, name)
    return summary


def cli_summary(rounds, name):
    """The CLI runs of backend `name` over all rounds: wall, bare import, their difference, memory."""
    per_round = [figures[name] for figures in rounds]
    wall = [figures["cli_wall_s"] for figures in per_round]
    bare = [figures["bare_import_s"] for figures in per_round]
    beyond_import = [whole - imported for whole, imported in zip(wall, bare)]
    ort_forward = [statistics.median(figures[PEER]["forward_times_s"]) for figures in rounds]
    return {
        "wall": measure.spread(wall),
        "bare_import": measure.spread(bare),
        "wall_minus_bare_import": measure.spread(beyond_import),
        "wall_minus_bare_import_over_onnxruntime_forward": statistics.median(
            [beyond / forward for beyond, forward in zip(beyond_import, ort_forward)]
        ),
        "peak_rss_mib": max(figures["cli_peak_rss_mib"] for figures in per_round),
    }


# --------------------------------------------------------------------------------------
# Report


def forward_table(results):
    """The forward passes as a Markdown table: the network, the crop function, ratios, agreement."""
    rows = []
    for name, summary in results["runtimes"].items():
        forward, crop_call = summary["forward"], summary["crop_call"]
        agreement = results["agreement"][name]["vs_opencv"]
        rows.append([
            summary["framework"],
            f"{forward['p50_s']:.3f}",
            f"{forward['p90_s']:.3f}",
            f"{forward['p90_over_p50']:.2f}",
            f"{forward['ratio_to_onnxruntime']:.2f}",
            f"{crop_call['p50_s']:.3f}" if name != PEER else "-",
            f"{crop_call['ratio_to_onnxruntime']:.2f}" if name != PEER else "-",
            summary["threads"],
            f"{summary['measuring_process_peak_rss_mib']:.0f}",
            f"{agreement['relative_diff']:.1e} of range, argmax {agreement['argmax_agreement']:.2%}",
        ])
    header = [
        "runtime", "network p50 s", "p90 s", "p90/p50", "÷ ORT", "CLI crop function p50 s", "÷ ORT", "threads",
        "peak RSS MiB", "logits vs OpenCV",
    ]
    return measure.markdown_table(header, rows)


def cli_table(results):
    """The CLI runs as a Markdown table."""
    rows = []
    for name, summary in results["runtimes"].items():
        if name == PEER:
            continue
        cli = summary["cli_noflip"]
        rows.append([
            summary["framework"],
            f"{cli['wall']['p50_s']:.2f}",
            f"{cli['wall']['p90_s']:.2f}",
            f"{cli['bare_import']['p50_s']:.2f}",
            f"{cli['wall_minus_bare_import']['p50_s']:.2f}",
            f"{cli['wall_minus_bare_import_over_onnxruntime_forward']:.2f}",
            f"{cli['peak_rss_mib']:.0f}",
        ])
    header = [
        "backend", "pspnet.py --no-flip p50 s", "p90 s", "bare import keras p50 s", "run − import p50 s",
        "(run − import) ÷ ORT forward", "peak RSS MiB",
    ]
    return measure.markdown_table(header, rows)


def startup_table(results):
    """The start-up steps, measured in process, as a Markdown table (medians over rounds)."""
    rows = []
    for summary in results["runtimes"].values():
        startup = summary["startup"]
        cells = [f"{startup[step]['p50_s']:.2f}" if step in startup else "-" for step in STARTUP_STEPS]
        total = sum(step["p50_s"] for step in startup.values())
        rows.append([summary["framework"], *cells, f"{total:.2f}"])
    return measure.markdown_table(["runtime", *(f"{label} s" for label in STARTUP_STEPS.values()), "sum s"], rows)


def report_text(results):
    """The whole report: machine, settings, the three tables."""
    machine = results["machine"]
    flags = machine["simd"] or f"none of {' '.join(measure.SIMD_FLAGS)}"
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    start, end = machine["loadavg_start"], machine["loadavg_end"]
    return "\n".join([
        f"Machine: {machine['cpu']}, {machine['cores']} usable cores ({machine['cpu_kind']}), flags: {flags}; "
        f"{machine['memory_gib']:.0f} GiB, {machine['platform']}, Python {machine['python']}",
        f"Packages: {packages}",
        f"{machine['date']} to {machine['date_end']}; load average (1/5/15 min) start "
        f"{start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}",
        f"{results['model']} at crop {results['crop_size']}, batch 1, float32, seeded synthetic weights; "
        f"{results['rounds']} rounds x {results['calls']} calls, runtimes in turns (orders: "
        + "; ".join(" ".join(order) for order in results["orders"]) + ")",
        "",
        "Forward pass of one crop (p50/p90 over all calls; ÷ ORT: median over rounds of the round's median ratio):",
        "",
        forward_table(results),
        "",
        f"CLI per image, {results['photo']} (one pass), wall time of the whole process:",
        "",
        cli_table(results),
        "",
        "Start-up, in process (medians over rounds; first call: the first crop-function call less a later one's "
        "median):",
        "",
        startup_table(results),
    ])


# --------------------------------------------------------------------------------------
# Command line


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each running every runtime once (default: %(default)s)")
    parser.add_argument("--calls", type=int,
                        help=f"timed calls of each function per runtime and round (default: {CALLS}, "
                        f"{DRY_RUN_CALLS} with --dry-run)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="directory of the results file (default: bench/results)")
    parser.add_argument("--crop", type=int, help=f"crop size, 48k - 7 (default: {MODEL}'s, 473)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"every step at crop {DRY_RUN_CROP}, in seconds: checks the benchmark, measures nothing")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="print the report of an earlier results file and measure nothing")
    parser.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--h5", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    return parser


def checked_arguments(argv):
    """The parsed command line, with its checks."""
    from pspnet_keras import models

    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.dry_run and args.crop is not None:
        parser.error("--dry-run sets the crop size; leave out --crop")
    if args.calls is None:
        args.calls = DRY_RUN_CALLS if args.dry_run else CALLS
    for option in ("rounds", "calls"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    args.crop = DRY_RUN_CROP if args.dry_run else args.crop or models.RELEASED_MODELS[MODEL].crop_size
    problem = models.crop_size_problem(args.crop)
    if problem:
        parser.error(f"--crop: {problem}")
    if args.child is None and args.prepare is None and args.from_json is None and not args.out.is_dir():
        parser.error(f"--out {args.out}: no such directory")
    return args


def results_path(args, machine):
    """The results file: backends_<model>_<cpu kind>.json in --out, with _crop<S> for another crop size."""
    crop = "" if model_config(args.crop).released else f"_crop{args.crop}"
    return args.out / f"backends_{MODEL}_{machine['cpu_kind']}{crop}.json"


def run_benchmark(args, work_dir):
    """Prepares the inputs, runs the rounds; returns the results."""
    machine = measure.machine_info(PACKAGES)
    measure.progress(PROG, f"synthetic weights, the ONNX graph and OpenCV's logits at crop {args.crop}")
    files = prepared_inputs(args, work_dir)
    (Path(work_dir) / "cli").mkdir()
    rounds, orders = run_rounds(files, args, work_dir)
    machine |= {"date_end": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_end": os.getloadavg()}
    return {
        "benchmark": PROG,
        "model": MODEL,
        "crop_size": args.crop,
        "dry_run": args.dry_run,
        "rounds": args.rounds,
        "calls": args.calls,
        "weights": f"seeded synthetic (bench/synthetic_caffe.py, seed of {MODEL}), converted by weight_converter.py",
        "photo": str(PHOTO.relative_to(PROJECT_ROOT)),
        "machine": machine,
        "orders": orders,
        "agreement": agreements(rounds[0], work_dir),
        "runtimes": {name: runtime_summary(rounds, name) for name in RUNTIMES},
    }


def main(argv=None):
    """Runs the benchmark, a measuring process (--child) or a reprint (--from-json); returns the exit status."""
    args = checked_arguments(argv)
    if args.child is not None:
        child(args)
        return 0
    if args.prepare is not None:
        prepare(args)
        return 0
    return measure.reprint_or_run(PROG, run_benchmark, args, results_path, report_text)


if __name__ == "__main__":
    sys.exit(main())
