"""TensorFlow's thread pools and oneDNN on this CPU: per-call times against ONNX Runtime.

    python -m bench.cpu_threads [--model pspnet50_ade20k] [--runs 8] [--passes 2] [--json FILE]

Thread pools and oneDNN are fixed when TensorFlow starts, so each setting runs in a
process of its own (the same script with --child), started with that setting's
environment; the settings take turns, --passes times, so that a machine whose speed
drifts slows all of them alike. In each process, on one crop-size image of the
model and the same seeded synthetic weights (bench/synthetic_caffe.py, converted by
weight_converter.py), three calls are timed in turns:

- network: this project's Keras network, crop -> logits read back to NumPy;
- cli_noflip: the CLI's work on one crop-size image with --no-flip, in process
  (pspnet_keras.segment.segment: predict, argmax, colour, blend, write the images);
- onnxruntime: ONNX Runtime on a graph built from the Caffe prototxt
  (bench/onnx_from_caffe.py), fp32, intra-op threads = the usable cores.

Reported per setting: p50 and p90 of each call, p90/p50, and the p50 ratios against
ONNX Runtime measured in the same process. The results file is named after the CPU
kind (bench/measure.py), and records the CPU's SIMD flags.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from datetime import timezone
from pathlib import Path

import utils
from bench import measure

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/cpu_threads.py"
# Each setting: the environment its process starts with. "0" lets TensorFlow choose
# (its own default: as many inter-op and intra-op threads as the machine has cores).
SETTINGS = {
    "tensorflow_defaults": {"TF_NUM_INTEROP_THREADS": "0", "TF_NUM_INTRAOP_THREADS": "0"},
    "project_rule": {},
    "project_rule_onednn_off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "tensorflow_defaults_onednn_off": {
        "TF_NUM_INTEROP_THREADS": "0", "TF_NUM_INTRAOP_THREADS": "0", "TF_ENABLE_ONEDNN_OPTS": "0",
    },
}
CALLS = ("network", "cli_noflip", "onnxruntime")
OWN_VARIABLES = ("TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_ENABLE_ONEDNN_OPTS")


def child(args):
    """Times the three calls in this process; prints {call: [seconds]} and the pool sizes as JSON."""
    from pspnet_keras import runtime

    tf = runtime.import_tensorflow()
    import numpy as np
    from PIL import Image

    import pspnet
    from bench.benchmark import cli_arguments
    from bench.synthetic_caffe import synthetic_image
    from pspnet_keras import cli
    from pspnet_keras import segment

    net = pspnet.PSPNet(args.model, weights=args.h5, show_progress=False)
    crop = synthetic_image(net.crop_size, 1)
    network = tf.function(lambda batch: net.model(batch, training=False))
    session = measure.onnxruntime_session(args.onnx, runtime.usable_cores())
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(crop.transpose(0, 3, 1, 2))}
    with tempfile.TemporaryDirectory() as work:
        image_path = Path(work) / "image.png"
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (net.crop_size, net.crop_size, 3), np.uint8)).save(
            image_path
        )
        cli_args = cli_arguments(net.model_name, args.h5, image_path, Path(work) / "out.png", ["--no-flip"])
        (outputs,) = pspnet.output_plan(cli_args, pspnet.input_paths(cli_args), videos=set()).values()
        calls = {
            "network": lambda: network(crop)[0].numpy(),
            "cli_noflip": lambda: segment.segment(
                net, utils.read_image(image_path), image_path, outputs, cli.protocol(cli_args), cli_args.quiet
            ),
            "onnxruntime": lambda: session.run(None, feed)[0],
        }
        times = measure.seconds_in_turns(calls, args.warmup, args.runs)
    inter, intra = runtime.thread_pool_sizes()
    print(json.dumps({"times": times, "inter_op": inter, "intra_op": intra, "environment": {
        name: os.environ.get(name) for name in OWN_VARIABLES}}))


def synthetic_files(model, work):
    """(.h5, .onnx) of `model` with the benchmark's seeded synthetic weights, written in `work`."""
    from bench import benchmark
    from bench.onnx_from_caffe import build_onnx_net

    synthetic = benchmark.SyntheticModel(model, None, work)
    onnx_path = Path(work) / f"{model}.onnx"
    onnx_path.write_bytes(build_onnx_net(synthetic.prototxt, synthetic.weights).model.SerializeToString())
    return synthetic.h5, onnx_path


def run_setting(name, args, h5, onnx_path):
    """One --child process with the environment of setting `name`; its JSON."""
    environment = {key: value for key, value in os.environ.items() if key not in OWN_VARIABLES}
    command = [
        sys.executable, "-m", "bench.cpu_threads", "--child", "--model", args.model, "--h5", str(h5),
        "--onnx", str(onnx_path), "--runs", str(args.runs), "--warmup", str(args.warmup),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=environment | SETTINGS[name], cwd=PROJECT_ROOT)
    if done.returncode:
        raise SystemExit(f"{PROG}: the {name} process failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(name, runs):
    """A setting's pooled figures over its passes: spreads of each call and p50 ratios to ONNX Runtime."""
    times = {call: [seconds for run in runs for seconds in run["times"][call]] for call in CALLS}
    spreads = {call: measure.spread(values) for call, values in times.items()}
    return {
        "setting": name,
        "environment": SETTINGS[name],
        "inter_op": runs[0]["inter_op"],
        "intra_op": runs[0]["intra_op"],
        "spreads": spreads,
        "network_over_onnxruntime": spreads["network"]["p50_s"] / spreads["onnxruntime"]["p50_s"],
        "cli_noflip_over_onnxruntime": spreads["cli_noflip"]["p50_s"] / spreads["onnxruntime"]["p50_s"],
        "times": times,
    }


def report(results):
    """The results as a Markdown table."""
    facts = results["cpu"]
    lines = [
        f"{facts['cpu']}, {facts['cores']} usable cores, SIMD: {facts['simd']} ({facts['kind']}); "
        f"{results['model']}, {results['runs']} calls x {results['passes']} passes per setting, {results['date']}",
        "",
        "| setting | inter-/intra-op threads | network p50 | p90/p50 | CLI --no-flip p50 | p90/p50 "
        "| ONNX Runtime p50 | p90/p50 | network ÷ ORT | CLI ÷ ORT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["settings"]:
        spreads = row["spreads"]
        pools = "/".join(str(count) if count else "TF's choice" for count in (row["inter_op"], row["intra_op"]))
        cells = [row["setting"], pools]
        for call in CALLS:
            cells += [f"{spreads[call]['p50_s']:.2f} s", f"{spreads[call]['p90_over_p50']:.2f}"]
        cells += [f"{row['network_over_onnxruntime']:.2f}", f"{row['cli_noflip_over_onnxruntime']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pspnet50_ade20k", help="released model (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=8, help="timed rounds per process (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--passes", type=int, default=2, help="processes per setting, in turns (default: %(default)s)")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS),
                        help="settings to measure (default: all)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="results file (default: bench/results/cpu_threads_<model>_<cpu kind>.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--h5", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    """Runs the benchmark; returns the exit status."""
    args = argument_parser().parse_args(argv)
    if args.child:
        child(args)
        return 0
    facts = measure.cpu_facts()
    out = args.json or BENCH_DIR / "results" / f"cpu_threads_{args.model}_{facts['kind']}.json"
    runs = {name: [] for name in args.settings}
    with tempfile.TemporaryDirectory() as work:
        h5, onnx_path = synthetic_files(args.model, work)
        for pass_number in range(args.passes):
            for name in args.settings:
                print(f"{PROG}: pass {pass_number + 1}/{args.passes}: {name}", file=sys.stderr, flush=True)
                runs[name].append(run_setting(name, args, h5, onnx_path))
    results = {
        "model": args.model, "runs": args.runs, "passes": args.passes, "cpu": facts,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_end": os.getloadavg(),
        "settings": [summary(name, setting_runs) for name, setting_runs in runs.items()],
    }
    measure.publish(PROG, out, results, report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
