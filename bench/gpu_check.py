"""One prepared check of the network on an accelerator: parity, precision, speed and memory.

    python -m bench.gpu_check [--models ...] [--budget-s 420] [--out bench/results]
    python -m bench.gpu_check --dry-run          # the same steps on the CPU at tiny sizes

For each released model, with seeded synthetic weights (bench/synthetic_caffe.py,
never presented as a segmentation result):

1. parity: the network on the accelerator against OpenCV's dnn module running the
   deploy prototxt on the CPU (an independent Caffe implementation): largest
   |delta p| of the softmax, largest |delta logit| relative to the logit range, argmax
   agreement;
2. precision: float32, mixed bfloat16 and mixed float16 against float32 on a real
   photo (example_images/), on the default protocol's crop and, where TensorFlow is
   the backend, through the whole default and sliding (-s) protocols;
3. forward time per crop for each precision at batch 1, 2, 4, 8 and 16, and the batch
   that is fastest per crop;
4. CLI time per image (TensorFlow backend only: the protocol runs in TensorFlow) in
   the default mode, -s and -s -ms, pspnet101_cityscapes on a 2048x1024 image, with
   the accelerator's utilisation sampled by nvidia-smi meanwhile;
5. peak accelerator memory per model.

It runs on whichever Keras backend is installed: TensorFlow, or JAX (the lent GPU
machines ship JAX but no TensorFlow; bench/README.md says how to carry Keras there).
Steps that do not fit in --budget-s are skipped and say so. It writes
<out>/gpu_<device>.json and prints a table.
"""

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import measure
from pspnet_keras import models
from pspnet_keras import runtime

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/gpu_check.py"
WEIGHT_SEEDS = {"pspnet50_ade20k": 50, "pspnet101_voc2012": 101, "pspnet101_cityscapes": 713}
INPUT_SEED = 7
PHOTO = PROJECT_ROOT / "example_images" / "rocket.jpg"
CITYSCAPES_IMAGE_SIZE = (1024, 2048)
BATCH_SIZES = (1, 2, 4, 8, 16)
PRECISIONS = runtime.PRECISIONS
CLI_MODES = {"default": {}, "-s": {"sliding": True}, "-s -ms": {"sliding": True, "multi_scale": True}}
WARMUP_CALLS = 2
TIMED_CALLS = 5
UTILISATION_PERIOD_S = 0.2
DEFAULT_BUDGET_S = 420
# The dry run: the same steps on the CPU, every network at the smallest crop (48k - 7).
DRY_RUN_CROP = 41
DRY_RUN_BASE = 40
DRY_RUN_BATCH_SIZES = (1, 2)
DRY_RUN_IMAGE_SIZE = (32, 48)


class Deadline:
    """The time left for the check; steps past it are skipped and recorded as such."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def passed(self):
        """Whether the budget is spent."""
        return time.monotonic() > self.end


def keras_backend():
    """The Keras backend in use ('tensorflow' or 'jax'), TensorFlow imported quietly when it is the one."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        runtime.import_tensorflow()
    import keras

    return keras.backend.backend()


def accelerator_name(backend):
    """The accelerator's name, or 'cpu' when there is none."""
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu") if gpus else "cpu"
    import jax

    device = jax.devices()[0]
    return device.device_kind if device.platform != "cpu" else "cpu"


def reset_peak_memory(backend):
    """Starts a new peak-memory measurement where the backend allows it."""
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")


def peak_memory_bytes(backend):
    """The accelerator's peak memory in use since the last reset, or None on the CPU."""
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return None
        return tf.config.experimental.get_memory_info("GPU:0")["peak"]
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def softmax(logits):
    """Softmax over the last axis, in float64."""
    exponentials = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def agreement(logits, reference):
    """How close (..., C) logits are to reference logits: |delta p|, relative |delta logit|, argmax."""
    return {
        "max_abs_dp": float(np.abs(softmax(logits) - softmax(reference)).max()),
        "max_rel_dlogit": float(np.abs(logits - reference).max() / (reference.max() - reference.min())),
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }


def probability_agreement(probabilities, reference):
    """How close (..., C) probabilities are to reference probabilities: |delta p| and argmax."""
    return {
        "max_abs_dp": float(np.abs(probabilities - reference).max()),
        "argmax_agreement": float((probabilities.argmax(-1) == reference.argmax(-1)).mean()),
    }


class UtilisationSampler:
    """The accelerator's utilisation (%) sampled by nvidia-smi while a `with` block runs."""

    def __init__(self):
        self.samples = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def sample(self):
        """Reads the utilisation every UTILISATION_PERIOD_S until stopped."""
        command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self.stop.wait(UTILISATION_PERIOD_S):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0 and result.stdout.strip().isdigit():
                self.samples.append(int(result.stdout.strip()))

    def summary(self):
        """Mean and maximum utilisation, or None without nvidia-smi."""
        if not self.samples:
            return None
        return {"mean_percent": statistics.mean(self.samples), "max_percent": max(self.samples)}


@dataclasses.dataclass
class CheckedModel:
    """A model under check: its config, its synthetic Caffe weights, the converted .h5 and the deploy prototxt."""

    config: models.ModelConfig
    prototxt: Path
    caffe_weights: dict
    h5: Path


def prepare_model(name, work_dir, dry_run):
    """A CheckedModel with seeded synthetic weights, converted to the Keras-2 layout by weight_converter.py
    (run as a command on a .caffemodel of them: the weights do not depend on the crop size)."""
    from bench.synthetic_caffe import caffemodel_layers
    from bench.synthetic_caffe import converter_process
    from bench.synthetic_caffe import synthetic_weights
    from bench.synthetic_caffe import write_caffemodel
    from pspnet_keras import caffe_net

    config = models.RELEASED_MODELS[name]
    if dry_run:
        config = dataclasses.replace(config, crop_size=DRY_RUN_CROP, base_size=DRY_RUN_BASE)
    prototxt = Path(work_dir) / f"{name}.prototxt"
    prototxt.write_text(caffe_net.deploy_prototxt(config))
    weights = synthetic_weights(prototxt, WEIGHT_SEEDS[name])
    caffemodel = Path(work_dir) / f"{name}.caffemodel"
    write_caffemodel(caffemodel, caffemodel_layers(prototxt, weights))
    h5 = Path(work_dir) / f"{name}.h5"
    converted = converter_process(caffemodel, "-o", h5)
    caffemodel.unlink()
    if converted.returncode:
        raise RuntimeError(f"weight_converter.py failed on the synthetic {name} weights: {converted.stderr.strip()}")
    return CheckedModel(config, prototxt, weights, h5)


def network(checked, precision):
    """The Keras network of a checked model at `precision`, with its weights."""
    import layers_builder

    model = layers_builder.build_pspnet(checked.config, precision=precision)
    layers_builder.load_weights(model, checked.h5)
    return model


def logits_of(model, batch):
    """float32 NumPy logits of a batch of preprocessed crops."""
    return np.asarray(model.predict_on_batch(batch), dtype=np.float32)


def parity(checked, model):
    """Item 1: the network against OpenCV's dnn on the CPU, on a synthetic image."""
    from bench.synthetic_caffe import opencv_logits
    from bench.synthetic_caffe import opencv_net
    from bench.synthetic_caffe import synthetic_image

    image = synthetic_image(checked.config.crop_size, INPUT_SEED)
    reference = opencv_logits(opencv_net(checked.prototxt, checked.caffe_weights), image)
    return agreement(logits_of(model, image)[0], reference)


def photo_crop(config, size):
    """The photo as the network takes it, without TensorFlow (the JAX backend has none): longer side
    `size` (Pillow's bilinear resize; the precisions are compared on this one input, so it need not be
    the protocol's resize), padded with the mean colour, BGR minus the mean, batch of one."""
    image = Image.open(PHOTO).convert("RGB")
    scale = size / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    crop = np.zeros((size, size, 3), np.float32)
    crop[: image.height, : image.width] = (np.asarray(image, np.float32) - np.float32(config.mean_rgb))[..., ::-1]
    return crop[np.newaxis]


def predictor(checked, model):
    """The evaluation protocol of the CLI around `model` (TensorFlow backend)."""
    import layers_builder
    from pspnet_keras import inference

    logits, upsampling = layers_builder.split_upsampling(model)
    config = checked.config
    return inference.Predictor(logits, config.crop_size, config.base_size, upsampling, mean_rgb=config.mean_rgb)


def photo(dry_run):
    """The real photo the precisions are compared on (shrunk for the dry run)."""
    image = Image.open(PHOTO).convert("RGB")
    if dry_run:
        image = image.resize(DRY_RUN_IMAGE_SIZE[::-1])
    return np.asarray(image)


def precision_report(checked, networks, backend, dry_run):
    """Item 2: each precision against float32 on the photo's crop and, with TensorFlow, the protocols."""
    crop = photo_crop(checked.config, checked.config.crop_size)
    reference = logits_of(networks["float32"], crop)[0]
    image = photo(dry_run)
    report = {}
    full_maps = {}
    for precision, model in networks.items():
        entry = {"crop": agreement(logits_of(model, crop)[0], reference)}
        if backend == "tensorflow":
            protocol = predictor(checked, model)
            for mode, flags in (("default", {}), ("-s", {"sliding": True})):
                full_maps[precision, mode] = protocol.predict(image, **flags)
                entry[mode] = probability_agreement(full_maps[precision, mode], full_maps["float32", mode])
        report[precision] = entry
    return report


def forward_times(model, crop_size, batch_sizes):
    """Item 3: seconds per crop at each batch size, and the fastest batch."""
    rng = np.random.default_rng(INPUT_SEED)
    per_crop = {}
    for batch in batch_sizes:
        crops = rng.normal(0, 60, (batch, crop_size, crop_size, 3)).astype(np.float32)
        per_crop[batch] = measure.median_seconds(lambda: model.predict_on_batch(crops), WARMUP_CALLS, TIMED_CALLS) / batch
    fastest = min(per_crop, key=per_crop.get)
    return {"per_crop_s": per_crop, "batch1_s": per_crop[1], "fastest_batch": fastest, "fastest_s": per_crop[fastest]}


def cli_image(checked, dry_run):
    """The image the CLI modes are timed on: the photo, or a 2048x1024 street-sized one for Cityscapes."""
    image = photo(dry_run)
    if checked.config.name == "pspnet101_cityscapes":
        height, width = DRY_RUN_IMAGE_SIZE if dry_run else CITYSCAPES_IMAGE_SIZE
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return image


def cli_times(checked, model, dry_run, deadline):
    """Item 4: seconds per image of the CLI's prediction (class_map) in each mode, with utilisation."""
    protocol = predictor(checked, model)
    image = cli_image(checked, dry_run)
    report = {}
    for mode, flags in CLI_MODES.items():
        if deadline.passed():
            report[mode] = {"skipped": "time budget spent"}
            continue
        protocol.class_map(image, **flags)
        with UtilisationSampler() as sampler:
            start = time.perf_counter()
            protocol.class_map(image, **flags)
            seconds = time.perf_counter() - start
        report[mode] = {
            "image": f"{image.shape[1]}x{image.shape[0]}",
            "passes": protocol.forward_count(*image.shape[:2], **flags),
            "seconds": seconds,
            "utilisation": sampler.summary(),
        }
    return report


def check_model(name, work_dir, args, backend, deadline):
    """Every item for one model."""
    checked = prepare_model(name, work_dir, args.dry_run)
    usable = [p for p in PRECISIONS if backend != "tensorflow" or p == "float32" or not args.dry_run]
    reset_peak_memory(backend)
    networks = {precision: network(checked, precision) for precision in usable}
    result = {
        "crop_size": checked.config.crop_size,
        "precisions_skipped": {
            p: "mixed precision is refused on a CPU by the TensorFlow path" for p in PRECISIONS if p not in usable
        },
        "parity_vs_opencv": parity(checked, networks["float32"]),
        "precision_vs_float32": precision_report(checked, networks, backend, args.dry_run),
    }
    batch_sizes = DRY_RUN_BATCH_SIZES if args.dry_run else BATCH_SIZES
    result["forward"] = {}
    for precision, model in networks.items():
        if deadline.passed():
            result["forward"][precision] = {"skipped": "time budget spent"}
            continue
        result["forward"][precision] = forward_times(model, checked.config.crop_size, batch_sizes)
    if backend == "tensorflow":
        result["cli"] = {p: cli_times(checked, networks[p], args.dry_run, deadline) for p in networks}
    else:
        result["cli"] = {"skipped": f"the protocol runs in TensorFlow; this backend is {backend}"}
    result["peak_memory_bytes"] = peak_memory_bytes(backend)
    return result


def table_lines(results):
    """The printed table: one line per model and precision."""
    lines = [
        f"{'model':<22} {'precision':<9} {'parity argmax':>13} {'|dp| vs f32':>11} {'argmax vs f32':>13} "
        f"{'fwd b1 ms':>9} {'best b':>6} {'ms/crop':>8} {'CLI default/-s/-s -ms s':>24} {'peak GiB':>8}"
    ]
    for name, result in results["models"].items():
        for precision, report in result["precision_vs_float32"].items():
            forward = result["forward"].get(precision, {})
            cli = result["cli"].get(precision, {}) if "skipped" not in result["cli"] else {}
            cli_text = "/".join(f"{cli[m]['seconds']:.2f}" if "seconds" in cli.get(m, {}) else "-" for m in CLI_MODES)
            peak = result["peak_memory_bytes"]
            lines.append(
                f"{name:<22} {precision:<9} {result['parity_vs_opencv']['argmax_agreement']:>13.5f} "
                f"{report['crop']['max_abs_dp']:>11.2e} {report['crop']['argmax_agreement']:>13.5f} "
                f"{1e3 * forward.get('batch1_s', float('nan')):>9.2f} {forward.get('fastest_batch', '-')!s:>6} "
                f"{1e3 * forward.get('fastest_s', float('nan')):>8.2f} {cli_text:>24} "
                f"{(peak or float('nan')) / 2**30:>8.2f}"
            )
    return lines


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=models.RELEASED_MODEL_NAMES, default=models.RELEASED_MODEL_NAMES)
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds after which remaining timings are skipped (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="folder of the JSON results")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"every step on the CPU with {DRY_RUN_CROP} px crops, to check the script itself")
    return parser.parse_args(argv)


def main(argv=None):
    """Runs the check; returns the exit code."""
    import utils

    args = parse_args(argv)
    deadline = Deadline(args.budget_s)
    backend = keras_backend()
    device = accelerator_name(backend)
    results = {
        "device": device,
        "backend": backend,
        "dry_run": args.dry_run,
        "python": platform.python_version(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as work_dir:
        for name in args.models:
            start = time.perf_counter()
            results["models"][name] = check_model(name, work_dir, args, backend, deadline)
            results["models"][name]["seconds"] = time.perf_counter() - start
    slug = "".join(c if c.isalnum() else "_" for c in device.lower()).strip("_")
    out = args.out / f"gpu_{'dry_run_' if args.dry_run else ''}{slug}.json"
    utils.write_json_atomic(out, results)
    print("\n".join(table_lines(results)))
    print(f"{PROG}: {device} ({backend}); results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
