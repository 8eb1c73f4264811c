"""Speed of this project's PSPNet against ONNX Runtime and OpenCV, and of its CLI protocol.

    python -m bench.benchmark [--models ...] [--runs N] [--skip-cli] [--skip-memory] [--json FILE]

In one run, on one machine, with the same seeded synthetic weights for all three
runtimes (bench/synthetic_caffe.py), it measures:

1. The forward pass of each model at its crop size (473 / 473 / 713): this
   project's network, compiled (crop -> logits read back to NumPy, what the peers
   compute), and the CLI's crop functions (`inference.Predictor.crop_function`:
   crop -> softmax probabilities, without and with the mirrored pass); ONNX
   Runtime running an ONNX graph built from the Caffe prototxt (bench/onnx_from_caffe.py; fp32,
   ORT_ENABLE_ALL, --threads intra-op threads); OpenCV's dnn running the prototxt.
   Medians of --runs calls after --warmup calls, GFLOP/s against the convolution
   counts of the deploy nets' convolutions, and ratios. Each runtime's output is checked once against
   OpenCV's logits for the same input, so all of them compute the same net.
2. The CLI's time per image in each mode, in-process: options parsed by the CLI's
   own parser, the network loaded once (`pspnet.PSPNet`, as `pspnet.run` does),
   and per image `utils.read_image` + `pspnet_keras.segment.segment` (the body of `run`'s loop:
   predict, argmax, colour, blend, write four images). Process start and model
   load are excluded. Compared with forward_count x the forward time.
3. The peak resident memory of `pspnet.py -m pspnet101_cityscapes -s -ms` on a
   2048x1024 image, run as a subprocess (several minutes).
"""

import argparse
import cProfile
import gc
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import pspnet  # noqa: E402  (the command this benchmark times)
import utils  # noqa: E402
from bench import measure  # noqa: E402
from bench.onnx_from_caffe import build_onnx_net  # noqa: E402
from bench.synthetic_caffe import caffemodel_layers  # noqa: E402
from bench.synthetic_caffe import opencv_logits  # noqa: E402
from bench.synthetic_caffe import opencv_net  # noqa: E402
from bench.synthetic_caffe import synthetic_image  # noqa: E402
from bench.synthetic_caffe import synthetic_weights  # noqa: E402
from bench.synthetic_caffe import write_caffemodel  # noqa: E402
from pspnet_keras import caffe_net  # noqa: E402
from pspnet_keras import cli  # noqa: E402
from pspnet_keras import segment  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/benchmark.py"
# The release's file names of the deploy prototxts (evaluation/prototxt of hszhao/PSPNet).
PROTOTXTS = {
    "pspnet50_ade20k": "pspnet50_ADE20K_473.prototxt",
    "pspnet101_voc2012": "pspnet101_VOC2012_473.prototxt",
    "pspnet101_cityscapes": "pspnet101_cityscapes_713.prototxt",
}
MODEL_NAMES = tuple(PROTOTXTS)
WEIGHT_SEEDS = {"pspnet50_ade20k": 50, "pspnet101_voc2012": 101, "pspnet101_cityscapes": 713}
INPUT_SEED = 1
# Convolution cost of one crop of the deploy nets, multiply-adds x 2.
SPEC_GFLOP = {"pspnet50_ade20k": 323, "pspnet101_voc2012": 460, "pspnet101_cityscapes": 1034}

# CLI modes: id -> command-line flags.
CLI_MODES = {
    "default": [],
    "default-noflip": ["--no-flip"],
    "s": ["-s"],
    "s-noflip": ["-s", "--no-flip"],
    "s-ms": ["-s", "-ms"],
    "s-ms-noflip": ["-s", "-ms", "--no-flip"],
}
DEFAULT_IMAGE = PROJECT_ROOT / "example_images" / "rocket.jpg"
CITYSCAPES_MODEL = "pspnet101_cityscapes"
CITYSCAPES_SIZE = (2048, 1024)
MEMORY_FLAGS = ["-s", "-ms"]
PACKAGES = ("tensorflow", "keras", "numpy", "pillow", "onnx", "onnxruntime", "opencv-python-headless")
PEERS = ("onnxruntime", "opencv")
# This project's timed functions and their table labels.
OUR_TIMINGS = {
    "ours": "ours: the network, crop -> logits",
    "ours_crop_function": "ours: CLI crop function (+ softmax)",
    "ours_flip_pair": "ours: CLI crop function with flip (2 passes)",
}
PROFILE_LINES = 12
STDERR_TAIL_CHARS = 2000
# Exit status on SIGTERM, after the temporary directory (synthetic weights) is removed.
EXIT_TERMINATED = 143


# --------------------------------------------------------------------------------------
# Measuring


def interleaved_timings(calls, warmup, runs):
    """Seconds of each of `calls` ({name: function}), taken in turns so that all see the same machine.

    `warmup` rounds, then `runs` rounds, each calling every function once.
    Returns {name: {"runs_s", "median_s", "p50_s", "p90_s", "p90_over_p50"}}.
    """
    return {
        name: {"runs_s": spent, "median_s": statistics.median(spent), **measure.spread(spent)}
        for name, spent in measure.seconds_in_turns(calls, warmup, runs).items()
    }


def first_call(call):
    """(seconds, result) of one call of `call`: for compiled functions, the tracing call."""
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def softmax(logits):
    """Softmax over the last axis, in float64."""
    exponentials = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def probability_agreement(probabilities, reference_logits):
    """How close (H, W, C) probabilities are to the softmax of reference logits."""
    reference = softmax(reference_logits)
    return {
        "max_abs_diff": float(np.abs(probabilities - reference).max()),
        "argmax_agreement": float((probabilities.argmax(-1) == reference.argmax(-1)).mean()),
    }


class SyntheticModel:
    """A released PSPNet with seeded synthetic weights: the Caffe arrays and their .h5 conversion.

    The .h5 is written by weight_converter.py from a synthetic .caffemodel, as the
    tests do, so this project loads exactly the arrays the peers run.
    """

    def __init__(self, name, caffe_dir, work_dir):
        self.name = name
        if caffe_dir is None:
            self.prototxt = Path(work_dir) / PROTOTXTS[name]
            self.prototxt.write_text(caffe_net.deploy_prototxt(name))
        else:
            self.prototxt = Path(caffe_dir) / PROTOTXTS[name]
        self.weights = synthetic_weights(self.prototxt, WEIGHT_SEEDS[name])
        self.h5 = Path(work_dir) / f"{name}.h5"
        caffemodel = Path(work_dir) / f"{name}.caffemodel"
        write_caffemodel(caffemodel, caffemodel_layers(self.prototxt, self.weights))
        command = [sys.executable, str(PROJECT_ROOT / "weight_converter.py"), str(self.prototxt), str(caffemodel)]
        converted = subprocess.run([*command, "-o", str(self.h5)], capture_output=True, text=True)
        caffemodel.unlink()
        if converted.returncode:
            raise RuntimeError(f"weight_converter.py failed on the synthetic {name} weights: {converted.stderr.strip()}")


# --------------------------------------------------------------------------------------
# 1. Forward pass


def onnxruntime_session(onnx_net, threads):
    """An fp32 CPU ONNX Runtime session of `onnx_net` (measure.onnxruntime_session)."""
    return measure.onnxruntime_session(onnx_net.model.SerializeToString(), threads)


def peer_calls(synthetic, image, args):
    """OpenCV's and ONNX Runtime's forward calls on `image` (1, S, S, 3), with what they compute.

    Returns ({name: call}, {name: settings}, OpenCV's logits, the ONNX graph's
    agreement with them, the ONNX graph's convolution FLOPs).
    """
    net = opencv_net(synthetic.prototxt, synthetic.weights)
    net.enableWinograd(True)
    reference = opencv_logits(net, image)
    onnx_net = build_onnx_net(synthetic.prototxt, synthetic.weights)
    session = onnxruntime_session(onnx_net, args.threads)
    feed = {onnx_net.input_name: np.ascontiguousarray(image.transpose(0, 3, 1, 2))}
    calls = {"onnxruntime": lambda: session.run(None, feed)[0], "opencv": lambda: opencv_logits(net, image)}
    settings = {
        "onnxruntime": f"CPUExecutionProvider, fp32, ORT_ENABLE_ALL, {args.threads} intra-op threads",
        "opencv": f"DNN_BACKEND_OPENCV on the CPU, Winograd on (OpenCV's default), {cv2.getNumThreads()} threads",
    }
    onnx_logits = calls["onnxruntime"]()[0].transpose(1, 2, 0)
    return calls, settings, reference, measure.logit_agreement(onnx_logits, reference), onnx_net.conv_flops


def our_calls(net, crop):
    """This project's calls on one crop, with the CLI's network (`pspnet.PSPNet`): {name: call}.

    - ours: the Keras network, compiled, crop -> logits at crop size read back to
      NumPy: what the peers compute.
    - ours_crop_function: the CLI's crop function without flip (the network to
      conv6, the x8 Interp and the softmax), probabilities read back.
    - ours_flip_pair: the same with the mirrored pass (2 passes).
    """
    network = tf.function(lambda batch: net.model(batch, training=False))
    side = net.crop_size
    single, pair = net.predictor.crop_function(False), net.predictor.crop_function(True)
    return {
        "ours": lambda: network(crop[np.newaxis])[0].numpy(),
        "ours_crop_function": lambda: np.asarray(single(crop, side, side)),
        "ours_flip_pair": lambda: np.asarray(pair(crop, side, side)),
    }


def measure_forward(model_name, synthetic, net, args):
    """Section 1 for one model: every runtime's timing, GFLOP/s, ratios and agreement.

    The five calls are timed in turns (interleaved_timings), after a first call of
    each (this project's tracing calls are reported).
    """
    image = synthetic_image(net.crop_size, INPUT_SEED)
    calls, settings, reference, onnx_parity, conv_flops = peer_calls(synthetic, image, args)
    calls = our_calls(net, image[0]) | calls
    first_calls = {name: first_call(call) for name, call in calls.items()}
    parity = {
        "onnxruntime_vs_opencv": onnx_parity,
        "ours_vs_opencv": measure.logit_agreement(first_calls["ours"][1], reference),
        "ours_crop_function_vs_opencv": probability_agreement(first_calls["ours_crop_function"][1], reference),
    }
    timings = interleaved_timings(calls, args.warmup, args.runs)
    del calls
    gc.collect()
    for name, timing in timings.items():
        timing["first_call_s"] = first_calls[name][0]
        timing["passes"] = 2 if name.endswith("_flip_pair") else 1
        timing["per_pass_s"] = timing["median_s"] / timing["passes"]
        timing["gflop_per_s"] = SPEC_GFLOP[model_name] / timing["per_pass_s"]
        if name in settings:
            timing["settings"] = settings[name]
    ratios = {
        f"{variant}_vs_{peer}": timings[variant]["per_pass_s"] / timings[peer]["per_pass_s"]
        for variant in OUR_TIMINGS
        for peer in PEERS
    }
    return {
        "crop_size": net.crop_size,
        "spec_gflop": SPEC_GFLOP[model_name],
        "onnx_graph_gflop": conv_flops / 1e9,
        "timings": timings,
        "ratios": ratios,
        "parity": parity,
    }


# --------------------------------------------------------------------------------------
# 2. CLI time per image


def cli_arguments(model_name, weights, image_path, output_path, flags):
    """The CLI's parsed options for one image and mode (quiet, as in a script)."""
    argv = ["-m", model_name, "-w", str(weights), "-i", str(image_path), "-o", str(output_path), "-q", *flags]
    return pspnet.argument_parser().parse_args(argv)


def profile_lines(call, lines):
    """One call of `call` under cProfile, as text lines: the project's own functions by
    cumulative time (where the protocol spends it), then all functions by own time."""
    profiler = cProfile.Profile()
    profiler.runcall(call)
    stats = pstats.Stats(profiler).stats

    def row(key, value):
        (file, line, function), (_, calls, own, cumulative, _) = key, value
        return f"  {cumulative:8.3f} s cumulative {own:8.3f} s own {calls:6d} calls  {Path(file).name}:{line} {function}"

    project = [item for item in stats.items() if Path(item[0][0]).parent in (PROJECT_ROOT, PROJECT_ROOT / "pspnet_keras")]
    by_cumulative = sorted(project, key=lambda item: item[1][3], reverse=True)[:lines]
    by_own = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:lines]
    return (
        ["project functions, most cumulative time first:"]
        + [row(*item) for item in by_cumulative]
        + ["all functions, most own time first:"]
        + [row(*item) for item in by_own]
    )


def measure_cli_mode(net, image_path, output_dir, mode, forward_calls, args):
    """Section 2 for one model and mode: CLI seconds per image against its forward passes.

    Each image is timed in turn with one network forward pass and one crop call
    (`forward_calls`, our_calls; interleaved_timings), so the overhead compares
    figures taken together.
    """
    cli_args = cli_arguments(net.model_name, net.weights_path, image_path, output_dir / f"{mode}.png", CLI_MODES[mode])
    (outputs,) = pspnet.output_plan(cli_args, pspnet.input_paths(cli_args), videos=set()).values()

    def segment_image():
        segment.segment(net, utils.read_image(image_path), image_path, outputs, cli.protocol(cli_args), cli_args.quiet)

    crop_call = "ours_flip_pair" if cli_args.flip else "ours_crop_function"
    calls = {"cli": segment_image, "forward": forward_calls["ours"], "crop_call": forward_calls[crop_call]}
    timings = interleaved_timings(calls, args.cli_warmup, args.cli_runs)
    timing = timings["cli"]
    width, height = Image.open(image_path).size
    passes = net.forward_count(
        height, width, sliding=cli_args.sliding, flip=cli_args.flip, multi_scale=cli_args.multi_scale
    )
    crop_calls = passes // 2 if cli_args.flip else passes
    passes_time = passes * timings["forward"]["median_s"]
    calls_time = crop_calls * timings["crop_call"]["median_s"]
    timing |= {
        "forward_s": timings["forward"]["median_s"],
        "crop_call_s": timings["crop_call"]["median_s"],
        "flags": " ".join(CLI_MODES[mode]) or "(none)",
        "forward_passes": passes,
        "crop_calls": crop_calls,
        "passes_x_forward_s": passes_time,
        "overhead_s": timing["median_s"] - passes_time,
        "overhead_pct": 100 * (timing["median_s"] - passes_time) / passes_time,
        "calls_x_crop_call_s": calls_time,
        "overhead_vs_calls_pct": 100 * (timing["median_s"] - calls_time) / calls_time,
    }
    if args.profile:
        timing["profile"] = profile_lines(segment_image, PROFILE_LINES)
    return timing


def measure_cli(net, image_path, work_dir, args):
    """Section 2 for one model: every selected mode."""
    output_dir = Path(work_dir) / f"{net.model_name}_outputs"
    width, height = Image.open(image_path).size
    forward_calls = our_calls(net, synthetic_image(net.crop_size, INPUT_SEED)[0])
    modes = {}
    for mode in args.cli_modes:
        measure.progress(PROG, f"{net.model_name}: CLI mode {mode}")
        modes[mode] = measure_cli_mode(net, image_path, output_dir, mode, forward_calls, args)
    return {"image": str(image_path), "image_size": [width, height], "modes": modes}


def cityscapes_image(source, work_dir):
    """A 2048x1024 PNG made by resizing the photograph `source` (a Cityscapes-sized input)."""
    path = Path(work_dir) / f"{Path(source).stem}_{CITYSCAPES_SIZE[0]}x{CITYSCAPES_SIZE[1]}.png"
    Image.fromarray(utils.read_image(source)).resize(CITYSCAPES_SIZE, Image.BICUBIC).save(path)
    return path


# --------------------------------------------------------------------------------------
# 3. Peak memory


def measure_memory(weights, image_path, work_dir):
    """Peak resident memory and wall time of `pspnet.py -s -ms` on pspnet101_cityscapes, a subprocess."""
    command = [
        sys.executable, str(PROJECT_ROOT / "pspnet.py"), "-m", CITYSCAPES_MODEL, "-w", str(weights),
        "-i", str(image_path), "-o", str(Path(work_dir) / "memory_run.png"), "-q", *MEMORY_FLAGS,
    ]
    stderr_path = Path(work_dir) / "memory_run.stderr"
    start = time.perf_counter()
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    width, height = Image.open(image_path).size
    memory = {
        "model": CITYSCAPES_MODEL,
        "flags": " ".join(MEMORY_FLAGS),
        "image_size": [width, height],
        "exit_code": process.returncode,
        "peak_rss_mib": usage.ru_maxrss / measure.KIB,
        "wall_s": wall,
    }
    if process.returncode:
        memory["stderr_tail"] = stderr_path.read_text()[-STDERR_TAIL_CHARS:]
    return memory


# --------------------------------------------------------------------------------------
# Report


def machine_info(args):
    """The machine, the package versions and the load average at the start, with the thread count."""
    return measure.machine_info(PACKAGES) | {"threads": args.threads}


def runtime_label(name, forward):
    """The table label of a timed runtime."""
    labels = {"onnxruntime": "ONNX Runtime", "opencv": "OpenCV dnn"}
    if name in labels:
        return labels[name]
    return OUR_TIMINGS[name]


def parity_text(name, forward):
    """The agreement with OpenCV of a runtime, as a table cell."""
    parity = forward["parity"]
    if name in ("onnxruntime", "ours"):
        agreement = parity[f"{name}_vs_opencv"]
        return f"max abs logit diff {agreement['relative_diff']:.1e} of range, argmax {agreement['argmax_agreement']:.2%}"
    if name == "ours_crop_function":
        agreement = parity["ours_crop_function_vs_opencv"]
        return f"max abs prob diff {agreement['max_abs_diff']:.1e}, argmax {agreement['argmax_agreement']:.2%}"
    return "reference" if name == "opencv" else ""


def forward_table(results):
    """Section 1 as a Markdown table."""
    rows = []
    for model_name, forward in results["forward"].items():
        timings = forward["timings"]
        for name, timing in timings.items():
            rows.append([
                model_name,
                str(forward["crop_size"]),
                runtime_label(name, forward),
                f"{timing['median_s']:.3f}",
                f"{timing['p90_over_p50']:.2f}" if "p90_over_p50" in timing else "-",
                f"{timing['per_pass_s']:.3f}",
                f"{timing['gflop_per_s']:.0f}",
                f"{timing['per_pass_s'] / timings['onnxruntime']['per_pass_s']:.2f}",
                f"{timing['per_pass_s'] / timings['opencv']['per_pass_s']:.2f}",
                parity_text(name, forward),
            ])
    header = ["model", "crop", "runtime", "median s", "p90 / p50", "s / pass", "GFLOP/s", "÷ ORT", "÷ OpenCV", "vs OpenCV output"]
    return measure.markdown_table(header, rows)


def cli_table(results):
    """Section 2 as a Markdown table."""
    rows = []
    for model_name, cli_result in results["cli"].items():
        for mode in cli_result["modes"].values():
            rows.append([
                model_name,
                "{}x{}".format(*cli_result["image_size"]),
                mode["flags"],
                str(mode["forward_passes"]),
                f"{mode['forward_s']:.2f}",
                f"{mode['median_s']:.2f}",
                f"{mode['passes_x_forward_s']:.2f}",
                f"{mode['overhead_s']:+.2f}",
                f"{mode['overhead_pct']:+.1f} %",
                f"{mode['calls_x_crop_call_s']:.2f}",
                f"{mode['overhead_vs_calls_pct']:+.1f} %",
            ])
    header = [
        "model", "image", "flags", "passes", "forward s", "CLI s / image", "passes × forward s", "overhead s",
        "overhead % of forward", "crop calls × call s", "overhead % of calls",
    ]
    return measure.markdown_table(header, rows)


def report_text(results):
    """The whole report: machine, forward table, CLI table, memory."""
    machine = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    start, end = machine["loadavg_start"], machine.get("loadavg_end", machine["loadavg_start"])
    settings = results["settings"]
    simd = f" ({machine['simd']})" if "simd" in machine else ""
    memory = f"{machine['memory_gib']:.0f} GiB, " if "memory_gib" in machine else ""
    lines = [
        f"Machine: {machine['cpu']}{simd}, {machine['cores']} cores, {memory}"
        f"{machine['platform']}, Python {machine['python']}",
        f"Packages: {packages}",
        f"Load average (1/5/15 min): start {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, "
        f"end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}; {machine['date']}",
        f"Forward: median of {settings['runs']} after {settings['warmup']} warm-up; "
        f"CLI: median of {settings['cli_runs']} after {settings['cli_warmup']} warm-up.",
    ]
    if results["forward"]:
        lines += ["", forward_table(results)]
    for model_name, forward in results["forward"].items():
        ratios = forward["ratios"]
        lines.append(
            f"{model_name}: graph {forward['onnx_graph_gflop']:.1f} GFLOP (deploy net convolutions {forward['spec_gflop']}); "
            f"ours/ORT {ratios['ours_vs_onnxruntime']:.2f}, ours/OpenCV {ratios['ours_vs_opencv']:.2f}; "
            f"CLI crop function: ours/ORT {ratios['ours_crop_function_vs_onnxruntime']:.2f}, "
            f"flip pair per pass {ratios['ours_flip_pair_vs_onnxruntime']:.2f}"
        )
        cli_timings = forward["timings"]
        lines.append(
            f"{model_name}: once per CLI process: network build + load {forward['cli_net_load_s']:.1f} s, "
            f"first (tracing) crop call {cli_timings['ours_crop_function']['first_call_s']:.1f} s, "
            f"first flip-pair call {cli_timings['ours_flip_pair']['first_call_s']:.1f} s"
        )
    if results["cli"]:
        lines += ["", cli_table(results)]
        for model_name, cli_result in results["cli"].items():
            for mode, timing in cli_result["modes"].items():
                if "profile" in timing:
                    lines += ["", f"Profile of one {model_name} image, flags {timing['flags']}:"]
                    lines += timing["profile"]
    memory = results["memory"]
    if memory:
        lines += [
            "",
            f"Peak RSS of pspnet.py -m {memory['model']} {memory['flags']} on a "
            f"{memory['image_size'][0]}x{memory['image_size'][1]} image: {memory['peak_rss_mib']:.0f} MiB "
            f"(wall {memory['wall_s']:.0f} s, exit code {memory['exit_code']})",
        ]
        if memory["exit_code"]:
            lines.append(f"The run failed; the end of its stderr:\n{memory['stderr_tail']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Command line


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Forward pass against ONNX Runtime and OpenCV, CLI time per image against its forward "
        "passes, and peak memory of the CLI, all with the same synthetic weights.",
    )
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES), metavar="MODEL",
                        help=f"models to measure (default: all of {', '.join(MODEL_NAMES)})")
    parser.add_argument("--runs", type=int, default=5, help="timed forward calls per runtime (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward calls first (default: 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="ONNX Runtime intra-op and OpenCV threads (default: the cores, %(default)s)")
    parser.add_argument("--caffe-dir", type=Path,
                        help="directory of the release's deploy prototxts (default: caffe_net's renderings of them)")
    parser.add_argument("--skip-forward", action="store_true", help="skip the forward pass comparison")
    parser.add_argument("--skip-cli", action="store_true", help="skip the CLI time per image")
    parser.add_argument("--cli-models", nargs="+", choices=MODEL_NAMES, metavar="MODEL",
                        help="models whose CLI modes are timed, among --models (default: all of --models)")
    parser.add_argument("--cli-modes", nargs="+", choices=tuple(CLI_MODES), default=list(CLI_MODES), metavar="MODE",
                        help=f"CLI modes to time: {', '.join(CLI_MODES)} (default: all)")
    parser.add_argument("--cli-runs", type=int, default=3, help="timed images per CLI mode (default: 3)")
    parser.add_argument("--cli-warmup", type=int, default=1, help="untimed images per CLI mode first (default: 1)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                        help="image for the ADE20K and VOC CLI runs (default: example_images/rocket.jpg, 640x427)")
    parser.add_argument("--cityscapes-image", type=Path,
                        help="image for the Cityscapes CLI and memory runs (default: --image resized to 2048x1024)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more image per CLI mode: the project's functions by cumulative "
                        "time, then all functions by own time")
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip the peak memory of pspnet.py -s -ms on pspnet101_cityscapes (a run of minutes)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="print the report of an earlier --json FILE and measure nothing")
    return parser


def checked_arguments(argv):
    """The parsed command line, with its cross-option checks."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return args
    args.cli_models = args.models if args.cli_models is None else args.cli_models
    if not set(args.cli_models) <= set(args.models):
        parser.error("--cli-models must be among --models (the CLI is compared with their forward time)")
    for option in ("runs", "cli_runs", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    for option in ("warmup", "cli_warmup"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must be at least 0")
    prototxts = [args.caffe_dir / PROTOTXTS[name] for name in args.models] if args.caffe_dir else []
    for path in prototxts + [args.image, args.cityscapes_image]:
        if path is not None and not path.is_file():
            parser.error(f"{path}: no such file")
    if args.json is not None and not args.json.resolve().parent.is_dir():
        parser.error(f"{args.json}: its directory does not exist")
    return args


def run_benchmark(args, work_dir):
    """Measures everything the options ask for; returns the results."""
    results = {
        "machine": machine_info(args),
        "settings": {name: getattr(args, name) for name in ("runs", "warmup", "cli_runs", "cli_warmup")},
        "forward": {},
        "cli": {},
        "memory": None,
    }
    needs_cityscapes_image = (not args.skip_cli and CITYSCAPES_MODEL in args.cli_models) or not args.skip_memory
    cityscapes = args.cityscapes_image or (cityscapes_image(args.image, work_dir) if needs_cityscapes_image else None)
    weights = {}
    for model_name in args.models:
        measure.progress(PROG, f"{model_name}: synthetic weights")
        synthetic = SyntheticModel(model_name, args.caffe_dir, work_dir)
        weights[model_name] = synthetic.h5
        start = time.perf_counter()
        net = pspnet.PSPNet(model_name, weights=synthetic.h5, show_progress=False)
        load_time = time.perf_counter() - start
        if not args.skip_forward:
            measure.progress(PROG, f"{model_name}: forward passes")
            forward = measure_forward(model_name, synthetic, net, args)
            forward["cli_net_load_s"] = load_time
            results["forward"][model_name] = forward
        del synthetic
        if not args.skip_cli and model_name in args.cli_models:
            image = cityscapes if model_name == CITYSCAPES_MODEL else args.image
            results["cli"][model_name] = measure_cli(net, image, work_dir, args)
        del net
        gc.collect()
    if not args.skip_memory:
        if CITYSCAPES_MODEL not in weights:
            measure.progress(PROG, f"{CITYSCAPES_MODEL}: synthetic weights")
            weights[CITYSCAPES_MODEL] = SyntheticModel(CITYSCAPES_MODEL, args.caffe_dir, work_dir).h5
        measure.progress(PROG, f"{CITYSCAPES_MODEL}: peak memory of pspnet.py {' '.join(MEMORY_FLAGS)} (minutes)")
        results["memory"] = measure_memory(weights[CITYSCAPES_MODEL], cityscapes, work_dir)
    results["machine"]["loadavg_end"] = os.getloadavg()
    return results


def main(argv=None):
    """Runs the benchmark (or reprints a saved one); returns the exit status."""
    args = checked_arguments(argv)
    if args.from_json is not None:
        try:
            results = json.loads(args.from_json.read_text())
            print(report_text(results))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"{PROG}: error: {args.from_json}: not a benchmark result file ({error})", file=sys.stderr)
            return 1
        return 0
    cv2.setNumThreads(args.threads)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(EXIT_TERMINATED))
    with tempfile.TemporaryDirectory(prefix="pspnet-bench-") as work_dir:
        results = run_benchmark(args, work_dir)
    print(report_text(results))
    if args.json is not None:
        utils.write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
