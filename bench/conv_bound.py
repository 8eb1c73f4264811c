"""What bounds the forward pass on this CPU: the costliest convolutions against the matmul peak.

    python -m bench.conv_bound [--model pspnet50_ade20k] [--top 5] [--runs 5] [--json FILE]

In one process, on this machine's usable cores, with TensorFlow started as the
commands start it (pspnet_keras.runtime):

1. The machine's float32 matmul peak: TensorFlow's and ONNX Runtime's MatMul of
   two MATMUL_SIDE-square matrices, GFLOP/s (the larger is the peak).
2. The --top costliest convolutions of the network at its crop size (by
   multiply-adds), each alone on a random input of its input shape: this
   project's layer (conv5_4 is PyramidConvolution, which computes the same
   convolution with fewer operations) and ONNX Runtime's Conv of the Caffe layer
   (for conv5_4: the 3x3 convolution of the 4096-channel concatenation, as the
   Caffe deploy net computes it). Seconds, GFLOP/s of the Caffe layer's work,
   and the share of the peak.

Medians of --runs calls in turns after a warm-up call, so a drifting machine
slows both runtimes alike. The results file is named after the CPU kind.
"""

import argparse
import statistics
import sys
from datetime import datetime
from datetime import timezone
from pathlib import Path

from pspnet_keras import runtime

BENCH_DIR = Path(__file__).resolve().parent

tf = runtime.import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto  # noqa: E402
from onnx import helper  # noqa: E402

import layers_builder  # noqa: E402
from bench import measure  # noqa: E402
from pspnet_keras import models  # noqa: E402

PROG = "bench/conv_bound.py"
MATMUL_SIDE = 2048
INPUT_SEED = 5


def ort_session(model_proto):
    """An ONNX Runtime CPU session (measure.onnxruntime_session) with the usable cores as intra-op threads."""
    return measure.onnxruntime_session(model_proto.SerializeToString(), runtime.usable_cores())


def single_node_model(node, inputs, output, initializers):
    """An opset-17 ONNX model of one node."""
    graph = helper.make_graph([node], "bench", inputs, [output], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_peak(runs):
    """GFLOP/s of a square float32 matmul in TensorFlow and in ONNX Runtime."""
    rng = np.random.default_rng(INPUT_SEED)
    a, b = (rng.standard_normal((MATMUL_SIDE, MATMUL_SIDE), dtype=np.float32) for _ in range(2))
    shape = [MATMUL_SIDE, MATMUL_SIDE]
    model = single_node_model(
        helper.make_node("MatMul", ["a", "b"], ["c"]),
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("a", "b")],
        helper.make_tensor_value_info("c", TensorProto.FLOAT, shape), [],
    )
    session = ort_session(model)
    ta, tb = tf.constant(a), tf.constant(b)
    matmul = tf.function(lambda: tf.linalg.matmul(ta, tb))
    times = measure.seconds_in_turns(
        {"tensorflow": lambda: matmul().numpy(), "onnxruntime": lambda: session.run(None, {"a": a, "b": b})[0]}, 1, runs
    )
    flop = 2 * MATMUL_SIDE**3
    return {name: flop / statistics.median(values) / 1e9 for name, values in times.items()}


def convolutions(network):
    """[(layer, input shape, output shape, Caffe multiply-adds)] of the network's convolutions, costliest first."""
    found = []
    for layer in network.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        output_shape = tuple(layer.output.shape[1:])
        kernel = tuple(layer.kernel.shape)
        multiply_adds = output_shape[0] * output_shape[1] * int(np.prod(kernel))
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        found.append((layer, [tuple(tensor.shape[1:]) for tensor in inputs], output_shape, multiply_adds))
    return sorted(found, key=lambda item: item[3], reverse=True)


def onnx_convolution(layer, input_shape):
    """ONNX Runtime's Conv computing the Caffe layer of `layer` on an (H, W, C) input (all channels for conv5_4)."""
    kernel = np.asarray(layer.kernel.numpy(), np.float32)
    height, width = input_shape[:2]
    channels = kernel.shape[2]
    k = kernel.shape[0]
    dilation = layer.dilation_rate[0]
    pad = dilation * (k - 1) // 2 if layer.padding == "same" else 0
    model = single_node_model(
        helper.make_node(
            "Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=list(layer.strides),
            dilations=[dilation, dilation], pads=[pad] * 4,
        ),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, height, width])],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
        [onnx.numpy_helper.from_array(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), "w")],
    )
    session = ort_session(model)
    data = np.random.default_rng(INPUT_SEED).standard_normal((1, channels, height, width), dtype=np.float32)
    return lambda: session.run(None, {"x": data})[0]


def keras_convolution(layer, input_shapes):
    """This project's layer alone on random inputs of its input shapes, compiled."""
    rng = np.random.default_rng(INPUT_SEED)
    inputs = [tf.constant(rng.standard_normal((1, *shape), dtype=np.float32)) for shape in input_shapes]
    call = tf.function(lambda: layer(inputs if len(inputs) > 1 else inputs[0]))
    return lambda: call().numpy()


def measure_layers(network, top, runs, peak):
    """Seconds and GFLOP/s of the `top` costliest convolutions, ours and ONNX Runtime's, in turns."""
    rows = []
    for layer, input_shapes, output_shape, multiply_adds in convolutions(network)[:top]:
        times = measure.seconds_in_turns(
            {"ours": keras_convolution(layer, input_shapes),
             "onnxruntime": onnx_convolution(layer, input_shapes[0])},
            1, runs,
        )
        gflop = 2 * multiply_adds / 1e9
        row = {"layer": layer.name, "input": input_shapes, "output": output_shape, "caffe_gflop": gflop}
        for name, values in times.items():
            seconds = statistics.median(values)
            row[name] = {"s": seconds, "gflop_per_s": gflop / seconds, "share_of_peak": gflop / seconds / peak}
        rows.append(row)
    return rows


def report(results):
    """The results as text with a Markdown table."""
    facts, peak = results["cpu"], results["matmul_gflop_per_s"]
    lines = [
        f"{facts['cpu']}, {facts['cores']} usable cores, SIMD: {facts['simd']} ({facts['kind']}); "
        f"{results['model']} at {results['crop_size']}, {results['date']}",
        f"float32 matmul {MATMUL_SIDE}^3: TensorFlow {peak['tensorflow']:.0f} GFLOP/s, "
        f"ONNX Runtime {peak['onnxruntime']:.0f} GFLOP/s",
        "",
        "| layer | Caffe GFLOP | ours s | ours GFLOP/s (share of peak) | ORT s | ORT GFLOP/s (share of peak) | ours ÷ ORT |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["layers"]:
        ours, theirs = row["ours"], row["onnxruntime"]
        lines.append(
            f"| {row['layer']} | {row['caffe_gflop']:.1f} | {ours['s']:.3f} | {ours['gflop_per_s']:.0f} "
            f"({ours['share_of_peak']:.0%}) | {theirs['s']:.3f} | {theirs['gflop_per_s']:.0f} "
            f"({theirs['share_of_peak']:.0%}) | {ours['s'] / theirs['s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    """Runs the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL, choices=models.RELEASED_MODEL_NAMES)
    parser.add_argument("--top", type=int, default=5, help="costliest convolutions to time (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls of each (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="results file (default: bench/results/conv_bound_<model>_<cpu kind>.json)")
    args = parser.parse_args(argv)
    facts = measure.cpu_facts()
    config = models.RELEASED_MODELS[args.model]
    network = layers_builder.build_pspnet(config)
    peaks = matmul_peak(args.runs)
    results = {
        "model": args.model, "crop_size": config.crop_size, "cpu": facts, "matmul_gflop_per_s": peaks,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "layers": measure_layers(network, args.top, args.runs, max(peaks.values())),
    }
    out = args.json or BENCH_DIR / "results" / f"conv_bound_{args.model}_{facts['kind']}.json"
    measure.publish(PROG, out, results, report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
