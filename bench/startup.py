"""Time to first result of a one-photo run of pspnet.py on each Keras backend, against its own forward pass.

    python -m bench.startup [--rounds 3] [--calls 3] [--backends tensorflow jax torch] [--out bench/results]
    python -m bench.startup --dry-run --out /tmp/dry          # crop 41, one round, one call (the tests)
    python -m bench.startup --from-json FILE                  # print the tables of a saved run again

The command measured is `pspnet.py -w H5 -i example_images/rocket.jpg -o OUT.png --no-flip -q
--backend B`: one forward pass. The run is made of rounds; each round gives every backend one turn,
in an order rotated from round to round (bench/backends.rotated), so that a machine whose speed
drifts (shared cores) slows all of them alike. A backend's turn is, each in a process of its own
with KERAS_BACKEND set (keras.io, "Configuring your backend"):

1. a bare `python -c "import keras"`: the backend's own import, wall seconds;
2. the command twice in a row with PSPNET_CACHE_DIR, the folder of pspnet.py's persistent
   compilation cache, set to a new empty folder: the first run starts with an empty cache, the
   second with what the first left there. Wall seconds of each, exit status 0 and the four
   outputs checked;
3. a stage process (this script with --child, the same cache folder as the second run) that
   times in process, in pspnet.py's order: `import pspnet` (the command module, which does not
   import Keras; this module imports only the standard library before it, so that the import
   is timed as the command makes it), `runtime.configure(backend=B); runtime.import_keras()`,
   reading the photo, `PSPNet(config, weights=H5)` (build + load), then its two steps a second
   time in the same process, timed apart, as the split of the first (reading the weights file,
   and building the network with them as starting values; a second time is a little faster), the first call of
   the command's crop function `Predictor.crop_function(False)` on a synthetic crop whose
   part inside the image is the photo's (trace / compile + one pass), --calls later calls
   (the forward pass), and `segment.segment()` on the photo, which writes its outputs.

From the stage process: trace = first call - forward p50; write = segment() - forward p50
(preprocessing the photo, the resize of the probabilities to the photo, the argmax, colours
and the PNG files); the sum of the stages a run makes (imports, read, build + load, first
call, write) and what is left of the second run beside it (Python's start, the command line,
exit). The two ratios, each per round, and their median over rounds:

    first-run ratio  = (first run - bare import) / forward p50,  target <= 2.5
    second-run ratio = (second run - bare import) / forward p50, target <= 1.6

ONNX Runtime's bare `python -c "import onnxruntime"` takes a turn of its own in every round, for
reference. Reported: p50 and p90 over rounds of every figure, the ratios against their targets.
The results file, startup_<model>_<cpu kind>.json (bench/measure.py's kind: widest vector
instructions and usable cores; _dry_run added for a dry run), records the CPU flags, the cores,
the package versions and the dates. --dry-run is the same at crop 41 (a user model of the same
layers and weights), one round and one call, for the tests. Weights are the seeded synthetic
ones of bench/synthetic_caffe.py converted by weight_converter.py: the speed does not depend on
their values, and no output here is a segmentation result.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from datetime import timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/startup.py"
MODEL = "pspnet50_ade20k"
PEER = "onnxruntime"
ROUNDS = 3
CALLS = 3
DRY_RUN_CROP = 41
DRY_RUN_ROUNDS = 1
DRY_RUN_CALLS = 1
# The folder pspnet.py keeps its persistent compilation cache in (pspnet_keras/compile_cache.py's
# CACHE_DIR_VARIABLE, not imported here: the stage process times `import pspnet` from a bare Python).
CACHE_VARIABLE = "PSPNET_CACHE_DIR"
# pspnet.py's options besides the weights, the photo and the output: one pass, no output on stdout.
CLI_OPTIONS = ("--no-flip", "-q")
PROTOCOL = {"sliding": False, "flip": False, "multi_scale": False}
TARGETS = {"first_run": 2.5, "second_run": 1.6}
RATIO_LABELS = {"first_run": "first run (empty cache)", "second_run": "second run (the first's cache)"}
PACKAGES = ("keras", "tensorflow", "jax", "jaxlib", "torch", "numpy", "onnxruntime", "h5py", "pillow")
# Every figure of a backend's turn, in the order of the report, with its label; `_s` are seconds.
FIGURES = {
    "bare_import_s": "bare `import keras`",
    "first_run_s": "pspnet.py, first run (empty cache)",
    "second_run_s": "pspnet.py, second run (the first's cache)",
    "library_import_s": "stage: `import pspnet`",
    "backend_import_s": "stage: import Keras + backend",
    "read_s": "stage: read the photo",
    "build_load_s": "stage: build + load (`PSPNet`)",
    "build_s": "  split: build with the weights (a second time)",
    "load_s": "  split: read the weights file (a second time)",
    "first_call_s": "stage: first crop-function call",
    "trace_s": "  of which trace / compile (− forward)",
    "forward_s": "stage: forward (later calls, p50)",
    "segment_s": "stage: `segment()` on the photo",
    "write_s": "  of which all but the pass (− forward)",
    "stages_sum_s": "sum of a run's stages",
    "second_run_rest_s": "second run − sum of stages",
}
# The stages a run of the command goes through once each, whose sum is compared with the second run.
RUN_STAGES = ("library_import_s", "backend_import_s", "read_s", "build_load_s", "first_call_s", "write_s")
STAGE_FILE_SUFFIX = "_stages.json"


# --------------------------------------------------------------------------------------
# The stage process (--child)


def imports_timed(name):
    """{"library_import_s", "backend_import_s", "pspnet_imports_keras"}: the seconds of `import pspnet`,
    then of importing Keras on the backend `name` as the command does, and whether the first already
    imported Keras. Nothing but the standard library is imported before."""
    start = time.perf_counter()
    import pspnet  # noqa: F401

    library_end = time.perf_counter()
    pspnet_imports_keras = "keras" in sys.modules
    from pspnet_keras import runtime

    runtime.configure(backend=name)
    runtime.import_keras()
    return {
        "library_import_s": library_end - start,
        "backend_import_s": time.perf_counter() - library_end,
        "pspnet_imports_keras": pspnet_imports_keras,
    }


def split_build_load(config, h5):
    """{"build_s", "load_s"}: the two steps of `layers_builder.build_loaded_pspnet` (what `PSPNet` does
    with a weights file) a second time in this process, timed apart: reading the arrays of `h5`, and
    building the network with them as its starting values (checked against the file)."""
    import layers_builder
    from bench.backends import seconds
    from pspnet_keras.keras2_weights import read_weights

    load_s, arrays = seconds(lambda: read_weights(h5))

    def build():
        network = layers_builder.build_pspnet(config, initialized=False, weights=arrays)
        layers_builder.check_weights(network, arrays, h5)

    build_s, _ = seconds(build)
    return {"build_s": build_s, "load_s": load_s}


def photo_part(net, image):
    """(rows, columns) of the photo scaled to the crop (the default mode): the part of the crop inside it."""
    from pspnet_keras.inference import scaled_size

    return scaled_size(image.shape[0], image.shape[1], net.crop_size)


def segment_timed(net, image, stem):
    """The seconds of `segment.segment()` on the photo with one pass, writing its outputs at `stem`
    (checked, then removed)."""
    from bench.backends import PHOTO
    from bench.backends import seconds
    from pspnet_keras.segment import output_paths
    from pspnet_keras.segment import segment

    outputs = output_paths(stem, ".png", save_probs=False)
    segment_s, _ = seconds(lambda: segment(net, image, PHOTO.name, outputs, dict(PROTOCOL), quiet=True))
    for output in outputs.values():
        if not output.is_file():
            raise SystemExit(f"{PROG}: segment() returned but wrote no {output}")
        output.unlink()
    return segment_s


def stages(name, h5, calls, stem):
    """Every stage of a one-photo run of pspnet.py on the backend `name`, timed in this process (the
    module's docstring): {figure: seconds, "forward_times_s": [each later call], "framework"}."""
    figures = imports_timed(name)
    from bench import measure
    from bench.backends import PHOTO
    from bench.backends import seconds
    from bench.backends import synthetic_crop
    from pspnet_keras import backend
    from pspnet_keras import models
    from pspnet_keras.segment import read_input_image
    from pspnet_keras.segmenter import PSPNet

    figures["read_s"], image = seconds(lambda: read_input_image(PHOTO))
    config = models.resolve_model(None, h5)
    figures["build_load_s"], net = seconds(lambda: PSPNet(config, weights=h5, show_progress=False))
    figures |= split_build_load(config, h5)
    crop = synthetic_crop(net.crop_size)
    rows, columns = photo_part(net, image)
    crop_function = net.predictor.crop_function(False)
    figures["first_call_s"], _ = seconds(lambda: crop_function(crop, rows, columns))
    forward = measure.seconds_in_turns({"forward": lambda: crop_function(crop, rows, columns)}, 0, calls)
    figures["forward_times_s"] = forward["forward"]
    figures["segment_s"] = segment_timed(net, image, stem)
    figures["framework"] = backend.framework_version()
    return figures


def child(args):
    """Measures the stages on the backend args.child and writes them (JSON) to args.result."""
    figures = stages(args.child, args.h5, args.calls, args.result.with_name(f"{args.child}_photo"))
    args.result.write_text(json.dumps(figures))


# --------------------------------------------------------------------------------------
# The rounds (parent)


def bare_import(name, work_dir):
    """Wall seconds of a bare `python -c "import keras"` on backend `name` (for ONNX Runtime, of
    `import onnxruntime`)."""
    from bench.backends import Process
    from bench.backends import environment_of

    module = "onnxruntime" if name == PEER else "keras"
    process = Process([sys.executable, "-c", f"import {module}"], environment_of(name), work_dir)
    process.check(f"import {module} on {name}")
    return process.wall_s


def cli_run(name, h5, environment, work_dir):
    """Wall seconds of `pspnet.py -w h5 -i PHOTO -o OUT.png --no-flip -q --backend name` in `environment`,
    its exit status and its outputs checked (then removed)."""
    from bench.backends import PHOTO
    from bench.backends import Process
    from pspnet_keras.segment import output_paths

    stem = Path(work_dir) / f"cli_{name}"
    command = [
        sys.executable, str(PROJECT_ROOT / "pspnet.py"), "-w", str(h5), "-i", str(PHOTO), "-o", f"{stem}.png",
        *CLI_OPTIONS, "--backend", name,
    ]
    process = Process(command, environment, work_dir)
    process.check(f"pspnet.py --backend {name}")
    for output in output_paths(stem, ".png", save_probs=False).values():
        if not output.is_file():
            raise SystemExit(f"{PROG}: pspnet.py --backend {name} exited 0 but wrote no {output}")
        output.unlink()
    return process.wall_s


def folder_contents(folder):
    """{"files", "bytes"} of everything under `folder`."""
    sizes = [path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()]
    return {"files": len(sizes), "bytes": sum(sizes)}


def stage_process(name, h5, environment, args, work_dir):
    """The stage figures of backend `name` from a --child process run in `environment`."""
    from bench.backends import Process

    result_path = Path(work_dir) / f"{name}{STAGE_FILE_SUFFIX}"
    command = [
        sys.executable, "-m", "bench.startup", "--child", name, "--h5", str(h5), "--calls", str(args.calls),
        "--result", str(result_path),
    ]
    process = Process(command, environment, work_dir)
    process.check(f"the stage process on {name}")
    figures = json.loads(result_path.read_text())
    result_path.unlink()
    return figures


def backend_turn(name, h5, args, work_dir):
    """One turn of backend `name`: the bare import, the two runs sharing a new cache folder (and what the
    first left in it), the stages with that cache."""
    from bench.backends import environment_of

    figures = {"bare_import_s": bare_import(name, work_dir)}
    cache = Path(tempfile.mkdtemp(prefix=f"cache_{name}_", dir=work_dir))
    environment = environment_of(name) | {CACHE_VARIABLE: str(cache)}
    figures["first_run_s"] = cli_run(name, h5, environment, work_dir)
    figures["cache_after_first_run"] = folder_contents(cache)
    figures["second_run_s"] = cli_run(name, h5, environment, work_dir)
    figures["stages"] = stage_process(name, h5, environment, args, work_dir)
    shutil.rmtree(cache)
    return figures


def run_rounds(h5, args, work_dir):
    """Every round's raw figures: ([{name: figures}], [order of each round]); ONNX Runtime's bare import
    takes a turn of its own."""
    from bench.backends import rotated

    names = (*args.backends, PEER)
    rounds, orders = [], []
    for round_number in range(args.rounds):
        order = rotated(names, round_number)
        figures = {}
        for name in order:
            progress(f"round {round_number + 1}/{args.rounds}: {name}")
            if name == PEER:
                figures[name] = {"bare_import_s": bare_import(name, work_dir)}
            else:
                figures[name] = backend_turn(name, h5, args, work_dir)
        rounds.append(figures)
        orders.append(order)
    return rounds, orders


def weights_file(config, work_dir):
    """The .h5 pspnet.py is given: weight_converter.py's conversion of the seeded synthetic Caffe weights
    of MODEL, or for another crop size a link to it with a user model's description beside it."""
    from bench.synthetic_caffe import SyntheticModel
    from pspnet_keras import models

    converted = SyntheticModel(MODEL, work_dir).converted_h5
    if config.released:
        return converted
    link = Path(work_dir) / f"{config.name}.h5"
    link.symlink_to(converted)
    models.description_path(link).write_text(json.dumps(config.description()))
    return link


# --------------------------------------------------------------------------------------
# Summary


def turn_figures(turn):
    """The FIGURES of one backend's turn (its raw figures): the measured ones, the forward p50 of its later
    calls and what is derived from them."""
    stage = turn["stages"]
    forward = statistics.median(stage["forward_times_s"])
    figures = {key: turn[key] for key in ("bare_import_s", "first_run_s", "second_run_s")}
    figures |= {key: stage[key] for key in ("library_import_s", "backend_import_s", "read_s", "build_load_s")}
    figures |= {
        "build_s": stage["build_s"],
        "load_s": stage["load_s"],
        "first_call_s": stage["first_call_s"],
        "trace_s": stage["first_call_s"] - forward,
        "forward_s": forward,
        "segment_s": stage["segment_s"],
        "write_s": stage["segment_s"] - forward,
    }
    figures["stages_sum_s"] = sum(figures[key] for key in RUN_STAGES)
    figures["second_run_rest_s"] = figures["second_run_s"] - figures["stages_sum_s"]
    return figures


def p50_p90(values):
    """{"per_round", "p50", "p90"} of one figure's values over the rounds."""
    from bench import measure

    return {"per_round": values, "p50": measure.percentile(values, 0.5), "p90": measure.percentile(values, 0.9)}


def ratio_summary(per_round_figures, run):
    """The ratio of `run` ("first_run", "second_run"): (its wall - the bare import) / forward p50, per round,
    their median, the target and whether the median meets it."""
    ratios = [
        (figures[f"{run}_s"] - figures["bare_import_s"]) / figures["forward_s"] for figures in per_round_figures
    ]
    median = statistics.median(ratios)
    return {"per_round": ratios, "median": median, "target": TARGETS[run], "met": median <= TARGETS[run]}


def backend_summary(rounds, name):
    """Backend `name` over all rounds: its framework, every figure's p50 / p90, the two ratios, what the
    first run left in the cache, whether `import pspnet` imported Keras."""
    turns = [figures[name] for figures in rounds]
    per_round = [turn_figures(turn) for turn in turns]
    return {
        "framework": turns[0]["stages"]["framework"],
        "figures": {key: p50_p90([figures[key] for figures in per_round]) for key in FIGURES},
        "ratios": {run: ratio_summary(per_round, run) for run in TARGETS},
        "cache_after_first_run": [turn["cache_after_first_run"] for turn in turns],
        "pspnet_imports_keras": any(turn["stages"]["pspnet_imports_keras"] for turn in turns),
    }


def summarized(rounds, backends):
    """{"backends": {name: backend_summary}, "onnxruntime_bare_import": p50_p90} of raw rounds."""
    return {
        "backends": {name: backend_summary(rounds, name) for name in backends},
        "onnxruntime_bare_import": p50_p90([figures[PEER]["bare_import_s"] for figures in rounds]),
    }


# --------------------------------------------------------------------------------------
# Report


def figures_table(results):
    """Every figure of every backend as a Markdown table: p50 and p90 over rounds, seconds."""
    from bench import measure

    backends = results["backends"]
    header = ["seconds"] + [cell for summary in backends.values() for cell in (f"{summary['framework']} p50", "p90")]
    rows = []
    for key, label in FIGURES.items():
        cells = [f"{backends[name]['figures'][key][quantile]:.2f}" for name in backends for quantile in ("p50", "p90")]
        rows.append([label, *cells])
    return measure.markdown_table(header, rows)


def ratio_table(results):
    """The two ratios of each backend as a Markdown table: the median over rounds, each round's, the target."""
    from bench import measure

    rows = []
    for summary in results["backends"].values():
        for run, ratio in summary["ratios"].items():
            rows.append([
                summary["framework"],
                RATIO_LABELS[run],
                f"{ratio['median']:.2f}",
                ", ".join(f"{value:.2f}" for value in ratio["per_round"]),
                f"<= {ratio['target']}",
                "met" if ratio["met"] else "not met",
            ])
    header = ["backend", "run", "(run − bare import) ÷ forward, median", "per round", "target", "met?"]
    return measure.markdown_table(header, rows)


def cache_line(results):
    """What each backend's first run left in its cache folder, as one line."""
    parts = []
    for summary in results["backends"].values():
        contents = summary["cache_after_first_run"]
        files = "/".join(str(content["files"]) for content in contents)
        mib = "/".join(f"{content['bytes'] / 2**20:.1f}" for content in contents)
        parts.append(f"{summary['framework']} {files} files, {mib} MiB")
    return f"Left in {CACHE_VARIABLE} by the first run (per round): " + "; ".join(parts)


def report_text(results):
    """The whole report: machine, settings, the figures, the ratios, the cache, ONNX Runtime's import."""
    machine = results["machine"]
    flags = machine["simd"] or "none of the listed SIMD flags"
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    start, end = machine["loadavg_start"], machine["loadavg_end"]
    onnxruntime_import = results["onnxruntime_bare_import"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} usable cores ({machine['cpu_kind']}), flags: {flags}; "
        f"{machine['memory_gib']:.0f} GiB, {machine['platform']}, Python {machine['python']}",
        f"Packages: {packages}",
        f"{machine['date']} to {machine['date_end']}; load average (1/5/15 min) start "
        f"{start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}",
        f"`{results['command']}` on {results['model']} at crop {results['crop_size']}, float32, seeded synthetic "
        f"weights; {results['rounds']} rounds x {results['calls']} forward calls, backends in turns (orders: "
        + "; ".join(" ".join(order) for order in results["orders"]) + ")",
        "",
        "Seconds, p50 and p90 over rounds (runs and bare import: wall time of the process; stages: in one "
        "process with the second run's cache; split: reading the weights and building with them, a second "
        "time in that process; forward: the round's p50 of the later crop-function calls; all but the pass: preprocessing, resize to the photo, "
        "argmax, colours, PNG files):",
        "",
        figures_table(results),
        "",
        "Time to first result, as forward passes beyond the backend's bare import:",
        "",
        ratio_table(results),
        "",
        cache_line(results),
        f"ONNX Runtime's bare `import onnxruntime`, for reference: p50 {onnxruntime_import['p50']:.2f} s, "
        f"p90 {onnxruntime_import['p90']:.2f} s",
    ]
    importers = [summary["framework"] for summary in results["backends"].values() if summary["pspnet_imports_keras"]]
    if importers:
        lines.append(f"`import pspnet` imported Keras on {', '.join(importers)}: its stage includes the backend's import")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Command line


def progress(message):
    """A progress line on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int,
                        help=f"rounds, each giving every backend one turn (default: {ROUNDS}, "
                        f"{DRY_RUN_ROUNDS} with --dry-run)")
    parser.add_argument("--calls", type=int,
                        help=f"timed later calls of the crop function per turn (default: {CALLS}, "
                        f"{DRY_RUN_CALLS} with --dry-run)")
    parser.add_argument("--backends", nargs="+", metavar="BACKEND",
                        help="the Keras backends measured, of tensorflow, jax and torch (default: all)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="directory of the results file (default: bench/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"crop {DRY_RUN_CROP}, one round, one call: checks the benchmark, measures nothing")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="print the report of an earlier results file and measure nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--h5", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def checked_arguments(argv):
    """The parsed command line, with its checks and the dry run's settings. The backends are checked
    against pspnet_keras.runtime's only in the parent: the stage process imports nothing before
    `import pspnet`."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = DRY_RUN_ROUNDS if args.dry_run else ROUNDS
    if args.calls is None:
        args.calls = DRY_RUN_CALLS if args.dry_run else CALLS
    for option in ("rounds", "calls"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.child is not None or args.from_json is not None:
        return args
    from pspnet_keras import runtime

    args.backends = args.backends or list(runtime.BACKENDS)
    unknown = [name for name in args.backends if name not in runtime.BACKENDS]
    if unknown:
        parser.error(f"--backends: {unknown[0]} is not a Keras backend; choose among {', '.join(runtime.BACKENDS)}")
    if len(set(args.backends)) < len(args.backends):
        parser.error("--backends: a backend is named twice")
    if not args.out.is_dir():
        parser.error(f"--out {args.out}: no such directory")
    return args


def results_path(args, machine):
    """The results file: startup_<model>_<cpu kind>.json in --out, _dry_run added for a dry run."""
    suffix = "_dry_run" if args.dry_run else ""
    return args.out / f"startup_{MODEL}_{machine['cpu_kind']}{suffix}.json"


def run_benchmark(args, work_dir):
    """Makes the weights, runs the rounds; returns the results."""
    from bench import measure
    from bench.backends import PHOTO
    from bench.backends import model_config
    from pspnet_keras import models

    machine = measure.machine_info(PACKAGES)
    config = model_config(DRY_RUN_CROP if args.dry_run else models.RELEASED_MODELS[MODEL].crop_size)
    progress(f"synthetic weights at crop {config.crop_size}, converted by weight_converter.py")
    h5 = weights_file(config, work_dir)
    rounds, orders = run_rounds(h5, args, work_dir)
    machine |= {"date_end": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_end": os.getloadavg()}
    photo = PHOTO.relative_to(PROJECT_ROOT)
    return {
        "benchmark": PROG,
        "model": MODEL,
        "crop_size": config.crop_size,
        "dry_run": args.dry_run,
        "rounds": args.rounds,
        "calls": args.calls,
        "command": f"pspnet.py -w H5 -i {photo} -o OUT.png {' '.join(CLI_OPTIONS)} --backend B",
        "cache_variable": CACHE_VARIABLE,
        "weights": f"seeded synthetic (bench/synthetic_caffe.py, seed of {MODEL}), converted by weight_converter.py",
        "machine": machine,
        "orders": orders,
        **summarized(rounds, args.backends),
        "rounds_figures": rounds,
    }


def main(argv=None):
    """Runs the benchmark, a stage process (--child) or a reprint (--from-json); returns the exit status."""
    args = checked_arguments(argv)
    if args.child is not None:
        child(args)
        return 0
    from bench import measure

    return measure.reprint_or_run(PROG, run_benchmark, args, results_path, report_text)


if __name__ == "__main__":
    sys.exit(main())
