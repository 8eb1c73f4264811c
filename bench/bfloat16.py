"""Mixed bfloat16 against float32 and ONNX Runtime on a CPU that computes bfloat16 in hardware, in turns.

    python -m bench.bfloat16 [--rounds 3] [--calls 3] [--out bench/results] [--dry-run]

pspnet.py runs --precision bfloat16 without a GPU only on TensorFlow, on a CPU with
AVX512_BF16 or AMX (pspnet_keras/runtime.py, pspnet_keras/cpu.py). On another CPU this
benchmark measures nothing: it prints one line saying why and records that, with the CPU's
flags, in its results file (exit 0).

On such a CPU it measures pspnet50_ade20k at crop 473, in rounds; each round gives every
runtime its turn once, in an order rotated from round to round (bench/backends.py), each in
a process of its own, since TensorFlow reads its oneDNN setting once, when it starts:

- float32: the TensorFlow network in float32 as pspnet.py runs it (oneDNN off);
- float32_onednn: the same with oneDNN on, which tells oneDNN's share of the gain from bfloat16's;
- bfloat16: the network in mixed bfloat16 as pspnet.py runs it (oneDNN on);
- onnxruntime: ONNX Runtime in float32 on the peer graph built from the Caffe deploy
  prototxt (bench/onnx_from_caffe.py, measure.onnxruntime_session), as bench/backends.py runs it.

A turn times one crop through the compiled network (backend.compile_network, logits read
back), --calls times after a first call. Reported per runtime: p50 and p90 over all calls of
all rounds, and the medians over rounds of the round's median ratio to float32's and to ONNX
Runtime's. The first round's bfloat16 process also runs pspnet.py's default protocol (the
image scaled to one crop, and its mirror) on each example photo (example_images/), in bfloat16
and with a float32 network of its own, and compares them: the share of pixels given the same
class, and the largest and mean |delta p|; and each runtime's logits on the crop are compared
with ONNX Runtime's. Weights are bench/synthetic_caffe.py's seeded synthetic ones converted by
weight_converter.py: no output here is a segmentation result.

The results file is bfloat16_<model>_<cpu kind>.json (bench/measure.py's kind). --dry-run
runs every step at crop 41 on any CPU (bfloat16 emulated, slowly, where the CPU lacks it),
one call per runtime, the parity on one photo (rocket.jpg): it checks the script and measures nothing.
"""

import argparse
import json
import os
import statistics
import sys
from datetime import datetime
from datetime import timezone
from pathlib import Path

import numpy as np

from bench import backends
from bench import measure
from pspnet_keras import cpu
from pspnet_keras import runtime

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/bfloat16.py"
MODEL = backends.MODEL
PEER = backends.PEER
REFERENCE = "float32"
# Each TensorFlow turn: the network's precision and the TF_ENABLE_ONEDNN_OPTS TensorFlow starts with.
TENSORFLOW_RUNS = {
    "float32": ("float32", runtime.ONEDNN_OPTS),
    "float32_onednn": ("float32", runtime.BFLOAT16_ONEDNN_OPTS),
    "bfloat16": ("bfloat16", runtime.BFLOAT16_ONEDNN_OPTS),
}
RUNTIMES = (*TENSORFLOW_RUNS, PEER)
CALLS = 3
DRY_RUN_CROP = 41
DRY_RUN_CALLS = 1
PHOTOS = tuple(sorted(path for path in (PROJECT_ROOT / "example_images").iterdir() if path.suffix in {".jpg", ".png"}))
DRY_RUN_PHOTOS = (PROJECT_ROOT / "example_images" / "rocket.jpg",)
PACKAGES = ("keras", "tensorflow", "numpy", "onnx", "onnxruntime", "h5py", "pillow")


# --------------------------------------------------------------------------------------
# Measuring processes (--child)


def keras_network(config, h5, precision):
    """The Keras network of `config` computing in `precision` with the weights `h5`, and pspnet.py's
    protocol around it (inference.Predictor)."""
    import layers_builder
    from pspnet_keras import inference

    model = layers_builder.build_loaded_pspnet(config, h5, precision=precision)
    logits_model, upsampling = layers_builder.split_upsampling(model)
    mean_rgb = config.mean_rgb
    return model, inference.Predictor(logits_model, config.crop_size, config.base_size, upsampling, mean_rgb=mean_rgb)


def photo_parity(config, h5, predictor, photos):
    """pspnet.py's default protocol on each of `photos` through `predictor` (bfloat16) against a float32
    network of this process: per photo and over all of them, the share of pixels of the same class and
    the largest and mean |delta p|."""
    import utils

    _, reference = keras_network(config, h5, "float32")
    per_photo = {}
    for path in photos:
        image = utils.read_image(path)
        probabilities, expected = predictor.predict(image), reference.predict(image)
        difference = np.abs(probabilities - expected)
        per_photo[path.name] = {
            "pixels": int(image.shape[0] * image.shape[1]),
            "argmax_agreement": float((probabilities.argmax(-1) == expected.argmax(-1)).mean()),
            "max_abs_dp": float(difference.max()),
            "mean_abs_dp": float(difference.mean()),
        }
    pixels = sum(photo["pixels"] for photo in per_photo.values())
    return {
        "photos": per_photo,
        "argmax_agreement": sum(photo["argmax_agreement"] * photo["pixels"] for photo in per_photo.values()) / pixels,
        "max_abs_dp": max(photo["max_abs_dp"] for photo in per_photo.values()),
        "mean_abs_dp": sum(photo["mean_abs_dp"] * photo["pixels"] for photo in per_photo.values()) / pixels,
    }


def tensorflow_child(args):
    """The network of the run args.child on the synthetic crop, timed in this process; with args.parity,
    also its parity with float32 on those photos."""
    precision, _ = TENSORFLOW_RUNS[args.child]
    runtime.configure(backend="tensorflow", precision=precision)
    runtime.import_keras()
    from pspnet_keras import backend

    config = backends.model_config(args.crop)
    model, predictor = keras_network(config, args.h5, precision)
    side = config.crop_size
    crop = backends.synthetic_crop(side)[np.newaxis]
    network = backend.compile_network(model, crop.shape)
    first_call_s, logits = backends.seconds(lambda: backend.to_numpy(network(crop)))
    times = measure.seconds_in_turns({"forward": lambda: backend.to_numpy(network(crop))}, 0, args.calls)
    figures = {
        "framework": backend.framework_version(),
        "precision": precision,
        "onednn": os.environ[runtime.ONEDNN_VARIABLE],
        "threads": backends.keras_threads("tensorflow"),
        "first_call_s": first_call_s,
        "forward_times_s": times["forward"],
    }
    if args.parity:
        figures["parity_vs_float32"] = photo_parity(config, args.h5, predictor, args.parity)
    return logits[0], figures


def onnxruntime_child(args):
    """ONNX Runtime's forward passes of the peer graph, timed in this process as bench/backends.py times them."""
    logits, figures = backends.onnxruntime_child(args)
    return logits, {
        "framework": figures["framework"],
        "precision": "float32",
        "onednn": None,
        "threads": figures["threads"],
        "first_call_s": figures["crop_first_call_s"],
        "forward_times_s": figures["forward_times_s"],
    }


def child(args):
    """Measures one runtime in this process and writes its figures (JSON) to args.result, and its
    logits (.npy) to args.logits where given."""
    measure_runtime = onnxruntime_child if args.child == PEER else tensorflow_child
    logits, figures = measure_runtime(args)
    figures["peak_rss_mib"] = measure.peak_rss_mib()
    if args.logits is not None:
        np.save(args.logits, logits)
    args.result.write_text(json.dumps(figures))


# --------------------------------------------------------------------------------------
# The rounds (parent)


def environment_of(name):
    """This process's environment for a child of runtime `name`: bench/backends.py's, and for TensorFlow
    the run's oneDNN setting."""
    environment = backends.environment_of("tensorflow" if name in TENSORFLOW_RUNS else PEER)
    if name in TENSORFLOW_RUNS:
        environment[runtime.ONEDNN_VARIABLE] = TENSORFLOW_RUNS[name][1]
    return environment


def measuring_process(name, files, first_round, args, work_dir):
    """Runs the --child process of runtime `name`: its figures and wall time; in the first round it also
    writes its logits and, for bfloat16, compares the photos with float32 (one photo in a dry run)."""
    result_path = Path(work_dir) / f"{name}.json"
    command = [
        sys.executable, "-m", "bench.bfloat16", "--child", name, "--h5", str(files["h5"]),
        "--onnx", str(files["onnx"]), "--crop", str(args.crop), "--calls", str(args.calls),
        "--result", str(result_path),
    ]
    if first_round:
        command += ["--logits", str(backends.logits_path(work_dir, name))]
        if name == "bfloat16":
            command += ["--parity", *map(str, DRY_RUN_PHOTOS if args.dry_run else PHOTOS)]
    process = backends.Process(command, environment_of(name), work_dir)
    process.check(f"the measuring process of {name}")
    figures = json.loads(result_path.read_text())
    result_path.unlink()
    return figures | {"process_wall_s": process.wall_s}


def run_rounds(files, args, work_dir):
    """Every round's figures of every runtime: ([{runtime: figures}], [order of each round])."""
    rounds, orders = [], []
    for round_number in range(args.rounds):
        order = backends.rotated(RUNTIMES, round_number)
        figures = {}
        for name in order:
            measure.progress(PROG, f"round {round_number + 1}/{args.rounds}: {name}")
            figures[name] = measuring_process(name, files, round_number == 0, args, work_dir)
        rounds.append(figures)
        orders.append(order)
    return rounds, orders


def median_ratios(rounds, name, reference):
    """Each round's median call of runtime `name` divided by runtime `reference`'s, and their median."""
    ratios = [
        statistics.median(figures[name]["forward_times_s"]) / statistics.median(figures[reference]["forward_times_s"])
        for figures in rounds
    ]
    return {"per_round": ratios, "median": statistics.median(ratios)}


def runtime_summary(rounds, name):
    """One runtime over all rounds: its calls' spread, its ratios to float32 and to ONNX Runtime."""
    per_round = [figures[name] for figures in rounds]
    first = per_round[0]
    return {
        "framework": first["framework"],
        "precision": first["precision"],
        "onednn": first["onednn"],
        "threads": first["threads"],
        "forward": measure.spread([seconds for figures in per_round for seconds in figures["forward_times_s"]]),
        "ratio_to_float32": median_ratios(rounds, name, REFERENCE),
        "ratio_to_onnxruntime": median_ratios(rounds, name, PEER),
        "peak_rss_mib": max(figures["peak_rss_mib"] for figures in per_round),
        "rounds": per_round,
    }


def logits_vs_onnxruntime(work_dir):
    """Each runtime's first-round logits on the crop against ONNX Runtime's (measure.logit_agreement)."""
    peer = np.load(backends.logits_path(work_dir, PEER))
    return {name: measure.logit_agreement(np.load(backends.logits_path(work_dir, name)), peer) for name in RUNTIMES}


def nothing_measured(machine):
    """The results of a run on a CPU that lacks AVX512_BF16 and AMX: why nothing was measured."""
    flags = cpu.cpu_flags()
    return {
        "benchmark": PROG,
        "measured": False,
        "why": (
            f"measured nothing: pspnet.py runs bfloat16 on the CPU only with {cpu.BFLOAT16_SETS}, and "
            f"{cpu.bfloat16_absence(flags)} (flags: {machine['simd'] or 'none of ' + ' '.join(measure.SIMD_FLAGS)})"
        ),
        "machine": machine,
        "cpu_flags": sorted(flags) if flags is not None else None,
    }


def run_benchmark(args, work_dir):
    """On a CPU that computes bfloat16 (or with --dry-run): prepares the inputs, runs the rounds and returns
    the results; elsewhere, returns why nothing was measured."""
    machine = measure.machine_info(PACKAGES)
    if not args.dry_run and not cpu.computes_bfloat16():
        return nothing_measured(machine)
    measure.progress(PROG, f"synthetic weights and the ONNX graph at crop {args.crop}")
    files = backends.prepared_inputs(args, work_dir)
    rounds, orders = run_rounds(files, args, work_dir)
    machine |= {"date_end": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_end": os.getloadavg()}
    return {
        "benchmark": PROG,
        "measured": True,
        "model": MODEL,
        "crop_size": args.crop,
        "dry_run": args.dry_run,
        "rounds": args.rounds,
        "calls": args.calls,
        "weights": f"seeded synthetic (bench/synthetic_caffe.py, seed of {MODEL}), converted by weight_converter.py",
        "machine": machine,
        "cpu_flags": sorted(cpu.cpu_flags() or ()),
        "orders": orders,
        "parity_vs_float32": rounds[0]["bfloat16"]["parity_vs_float32"],
        "logits_vs_onnxruntime": logits_vs_onnxruntime(work_dir),
        "runtimes": {name: runtime_summary(rounds, name) for name in RUNTIMES},
    }


# --------------------------------------------------------------------------------------
# Report


def runtime_table(results):
    """The forward passes as a Markdown table."""
    rows = []
    for name, summary in results["runtimes"].items():
        agreement = results["logits_vs_onnxruntime"][name]
        rows.append([
            name,
            summary["framework"],
            summary["onednn"] or "-",
            f"{summary['forward']['p50_s']:.3f}",
            f"{summary['forward']['p90_s']:.3f}",
            f"{summary['ratio_to_float32']['median']:.2f}",
            f"{summary['ratio_to_onnxruntime']['median']:.2f}",
            f"{agreement['relative_diff']:.1e} of range, argmax {agreement['argmax_agreement']:.2%}",
        ])
    header = ["runtime", "framework", "oneDNN", "p50 s", "p90 s", "÷ float32", "÷ ORT", "logits vs ORT"]
    return measure.markdown_table(header, rows)


def parity_table(results):
    """bfloat16 against float32 on the photos as a Markdown table."""
    parity = results["parity_vs_float32"]
    rows = [
        [name, f"{photo['argmax_agreement']:.2%}", f"{photo['max_abs_dp']:.1e}", f"{photo['mean_abs_dp']:.1e}"]
        for name, photo in {**parity["photos"], "all": parity}.items()
    ]
    return measure.markdown_table(["photo", "same class", "max |dp|", "mean |dp|"], rows)


def report_text(results):
    """The report: the one line of a run that measured nothing; else machine, settings and the two tables."""
    if not results["measured"]:
        return f"{PROG}: {results['why']}"
    machine = results["machine"]
    return "\n".join([
        f"Machine: {machine['cpu']}, {machine['cores']} usable cores ({machine['cpu_kind']}), flags: "
        f"{machine['simd']}; {machine['platform']}, Python {machine['python']}",
        f"{machine['date']} to {machine['date_end']}",
        f"{results['model']} at crop {results['crop_size']}, batch 1, seeded synthetic weights; {results['rounds']} "
        f"rounds x {results['calls']} calls, runtimes in turns"
        + (" (dry run: checks the script, measures nothing)" if results["dry_run"] else ""),
        "",
        "Forward pass of one crop (÷: median over rounds of the round's median ratio):",
        "",
        runtime_table(results),
        "",
        "bfloat16 against float32, pspnet.py's default protocol on each photo:",
        "",
        parity_table(results),
    ])


# --------------------------------------------------------------------------------------
# Command line


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each running every runtime once (default: %(default)s)")
    parser.add_argument("--calls", type=int,
                        help=f"timed calls per runtime and round (default: {CALLS}, {DRY_RUN_CALLS} with --dry-run)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="directory of the results file (default: bench/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"every step at crop {DRY_RUN_CROP} on any CPU: checks the benchmark, measures nothing")
    parser.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--crop", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--h5", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--parity", nargs="+", type=Path, help=argparse.SUPPRESS)
    return parser


def checked_arguments(argv):
    """The parsed command line, with its checks."""
    from pspnet_keras import models

    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = DRY_RUN_CALLS if args.dry_run else CALLS
    for option in ("rounds", "calls"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.crop is None:
        args.crop = DRY_RUN_CROP if args.dry_run else models.RELEASED_MODELS[MODEL].crop_size
    if args.child is None and not args.out.is_dir():
        parser.error(f"--out {args.out}: no such directory")
    return args


def results_path(args, machine):
    """The results file: bfloat16_<model>_<cpu kind>.json in --out, with _crop<S> for another crop size."""
    crop = "" if backends.model_config(args.crop).released else f"_crop{args.crop}"
    return args.out / f"bfloat16_{MODEL}_{machine['cpu_kind']}{crop}.json"


def main(argv=None):
    """Runs the benchmark, or a measuring process (--child); returns the exit status."""
    args = checked_arguments(argv)
    if args.child is not None:
        child(args)
        return 0
    return measure.run_in_temporary_folder(PROG, run_benchmark, args, results_path, report_text)


if __name__ == "__main__":
    sys.exit(main())
