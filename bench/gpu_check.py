"""One prepared check of the network on an accelerator: parity, precision, speed and memory.

    python -m bench.gpu_check [--models ...] [--budget-s 420] [--out bench/results]
    python -m bench.gpu_check --dry-run          # the same steps on the CPU at tiny sizes

It runs on the Keras backend chosen the Keras way (KERAS_BACKEND, else keras.json,
else TensorFlow; pspnet_keras/runtime.py): TensorFlow, JAX or PyTorch. For each
released model, with seeded synthetic weights (bench/synthetic_caffe.py, never
presented as a segmentation result):

1. parity: the network on the accelerator against OpenCV's dnn module running the
   deploy prototxt on the CPU (an independent Caffe implementation): largest
   |delta p| of the softmax, largest |delta logit| relative to the logit range, argmax
   agreement;
2. precision: float32, mixed bfloat16 and mixed float16 against float32 on a real
   photo (example_images/): on the default protocol's crop of it, and through the
   whole default and sliding (-s) protocols;
3. forward time per crop for each precision at batch 1, 2, 4, 8 and 16, and the batch
   that is fastest per crop: the network as the CLI runs it (up to conv6's logits,
   compiled by pspnet_keras.backend.compile_network; the protocol upsamples the part
   of each crop it keeps), its logits copied to the host, which waits for the device;
4. CLI time per image for each precision (inference.Predictor, as pspnet.py runs it)
   in the default mode, -s and -s -ms, pspnet101_cityscapes on a 2048x1024 image,
   with the accelerator's utilisation sampled by nvidia-smi meanwhile;
5. peak accelerator memory per model: since the model's start on TensorFlow and
   PyTorch; since the process's start on JAX, whose devices keep one peak that
   cannot be reset (check one model per run there for a model's own peak).

Steps that cannot run here say so in the results ({"skipped": why}) and are listed
after the table: steps past --budget-s, and the protocol and CLI steps of a mixed
precision this process refuses (runtime.precision_problem: float16 without a GPU;
bfloat16 without a GPU, except on TensorFlow with oneDNN on a CPU with AVX512_BF16 or
AMX, and this check starts TensorFlow with oneDNN off, as float32 runs). The dry run
therefore compares the mixed precisions with float32 on the crop and times their
forward passes, on the CPU, but runs the protocols in float32 only (bench/bfloat16.py
measures bfloat16 on such a CPU).
It writes <out>/gpu_<device>_<backend>.json and prints a table.

On a machine with PyTorch or JAX and no TensorFlow (the lent GPU machines), carry
the project and install, beside the framework there, what it needs without
TensorFlow: keras, numpy, pillow, h5py, opencv-python-headless, protobuf, tqdm and threadpoolctl
at the versions of requirements.txt and requirements-test.txt; then
    KERAS_BACKEND=jax python -m bench.gpu_check       # or KERAS_BACKEND=torch
Nothing on those backends' path imports TensorFlow (tests/test_gpu_check.py runs
their dry runs with TensorFlow made unimportable).
"""

import argparse
import dataclasses
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
INPUT_SEED = 7
PHOTO = PROJECT_ROOT / "example_images" / "rocket.jpg"
PRECISIONS = runtime.PRECISIONS
PROTOCOL_MODES = {"default": {}, "-s": {"sliding": True}}
CLI_MODES = {"default": {}, "-s": {"sliding": True}, "-s -ms": {"sliding": True, "multi_scale": True}}
STREET_MODEL = "pspnet101_cityscapes"
UTILISATION_PERIOD_S = 0.2
DEFAULT_BUDGET_S = 420
BUDGET_SPENT = {"skipped": "time budget spent"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes and call counts of a run. `crop_size` and `base_size` None keep the model's;
    `photo_size` None keeps the photo's; sizes are (height, width)."""

    batch_sizes: tuple
    warmup_calls: int
    timed_calls: int
    cli_warmup_calls: int
    crop_size: int = None
    base_size: int = None
    photo_size: tuple = None
    street_size: tuple = (1024, 2048)


FULL_RUN = Plan(batch_sizes=(1, 2, 4, 8, 16), warmup_calls=2, timed_calls=5, cli_warmup_calls=1)
# The same steps on the CPU, each call made once, each network at the smallest crop (48k - 7), on a 48x32
# image with a base size that gives -s -ms two crops at its largest scale: the dry run checks the script,
# its times are not measurements.
DRY_RUN = Plan(
    batch_sizes=(1, 2), warmup_calls=0, timed_calls=1, cli_warmup_calls=0, crop_size=41, base_size=24,
    photo_size=(32, 48), street_size=(32, 48),
)


class Deadline:
    """The time left for the check; steps past it are skipped and recorded as such."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def passed(self):
        """Whether the budget is spent."""
        return time.monotonic() > self.end


def reset_peak_memory(backend_name):
    """Starts a new peak-memory measurement on the accelerator; returns since when the next reading
    counts: 'model start', or 'process start' where the backend keeps one peak (JAX)."""
    if backend_name == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")
        return "model start"
    if backend_name == "jax":
        return "process start"
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(0)
    return "model start"


def peak_memory_bytes(backend_name):
    """The accelerator's peak bytes in use since `reset_peak_memory` (JAX: since the process started),
    or None on the CPU."""
    if backend_name == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return None
        return tf.config.experimental.get_memory_info("GPU:0")["peak"]
    if backend_name == "jax":
        import jax

        device = jax.devices()[0]
        stats = (device.memory_stats() or {}) if device.platform != "cpu" else {}
        return stats.get("peak_bytes_in_use")
    import torch

    return torch.cuda.max_memory_allocated(0) if torch.cuda.is_available() else None


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


def prepare_model(name, work_dir, plan):
    """A CheckedModel with seeded synthetic weights, converted to the Keras-2 layout by weight_converter.py
    (run as a command on a .caffemodel of them: the weights do not depend on the crop size)."""
    from bench.synthetic_caffe import WEIGHT_SEEDS
    from bench.synthetic_caffe import caffemodel_layers
    from bench.synthetic_caffe import converter_process
    from bench.synthetic_caffe import synthetic_weights
    from bench.synthetic_caffe import write_caffemodel
    from pspnet_keras import caffe_net

    config = models.RELEASED_MODELS[name]
    config = dataclasses.replace(
        config, crop_size=plan.crop_size or config.crop_size, base_size=plan.base_size or config.base_size
    )
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


class Network:
    """A checked model's Keras network at one precision, with its weights, run as the CLI runs it."""

    def __init__(self, checked, precision):
        import layers_builder
        from pspnet_keras import inference

        self.precision = precision
        self.crop_size = checked.config.crop_size
        self.model = layers_builder.build_pspnet(checked.config, precision=precision, initialized=False)
        layers_builder.load_weights(self.model, checked.h5)
        self.logits_model, upsampling = layers_builder.split_upsampling(self.model)
        config = checked.config
        self.protocol = inference.Predictor(
            self.logits_model, config.crop_size, config.base_size, upsampling, mean_rgb=config.mean_rgb
        )
        self.compiled = {}

    def compiled_call(self, model, batch):
        """model(batch) as float32 NumPy, compiled by the backend as the Predictor compiles its network,
        once per model and batch shape; the copy to the host waits for the device to finish."""
        from pspnet_keras import backend

        key = (model.name, batch.shape)
        if key not in self.compiled:
            self.compiled[key] = backend.compile_network(model, batch.shape)
        return backend.to_numpy(self.compiled[key](batch))

    def logits(self, batch):
        """The whole network's logits (at the crop's resolution) of a batch of preprocessed crops."""
        return self.compiled_call(self.model, batch)

    def timed_forward(self, batch_size):
        """A call of the network up to conv6's logits (the part the Predictor compiles) on a random batch."""
        rng = np.random.default_rng(INPUT_SEED)
        crops = rng.normal(0, 60, (batch_size, self.crop_size, self.crop_size, 3)).astype(np.float32)
        return lambda: self.compiled_call(self.logits_model, crops)


def parity(checked, network):
    """Item 1: the float32 network against OpenCV's dnn on the CPU, on a synthetic image."""
    from bench.synthetic_caffe import opencv_logits
    from bench.synthetic_caffe import opencv_net
    from bench.synthetic_caffe import synthetic_image

    image = synthetic_image(checked.config.crop_size, INPUT_SEED)
    reference = opencv_logits(opencv_net(checked.prototxt, checked.caffe_weights), image)
    return agreement(network.logits(image)[0], reference)


def photo(plan):
    """The real photo (uint8 RGB) the precisions are compared on, at the plan's size."""
    image = Image.open(PHOTO).convert("RGB")
    if plan.photo_size is not None:
        image = image.resize(plan.photo_size[::-1], Image.BILINEAR)
    return np.asarray(image)


def default_crop(config, image):
    """The default protocol's crop of a uint8 RGB image as the network takes it: scaled to a longer side
    of the crop size, preprocessed, padded with the mean colour (zero), batch of one."""
    from pspnet_keras import inference

    height, width = inference.scaled_size(*image.shape[:2], config.crop_size)
    crop = np.zeros((1, config.crop_size, config.crop_size, 3), np.float32)
    crop[0, :height, :width] = inference.preprocess(inference.resize_image(image, height, width), config.mean_rgb)
    return crop


def refusal(precision):
    """{"skipped": why} where this process refuses `precision` (runtime.precision_problem, as PSPNet
    refuses it), else None."""
    from pspnet_keras import backend

    problem = runtime.precision_problem(precision, backend.gpu_names())
    return {"skipped": f"refused here: {problem}"} if problem else None


def precision_report(checked, networks, plan):
    """Item 2: each precision against float32 on the photo's default crop and through the protocols
    (float32's row: the crop computed again, which shows whether the compiled call repeats itself)."""
    image = photo(plan)
    crop = default_crop(checked.config, image)
    reference_logits = networks["float32"].logits(crop)[0]
    reference_maps = {}
    report = {}
    for precision, network in networks.items():
        report[precision] = {"crop": agreement(network.logits(crop)[0], reference_logits)}
        if precision == "float32":
            continue
        for mode, flags in PROTOCOL_MODES.items():
            refused = refusal(precision)
            if refused:
                report[precision][mode] = refused
                continue
            if mode not in reference_maps:
                reference_maps[mode] = networks["float32"].protocol.predict(image, **flags)
            probabilities = network.protocol.predict(image, **flags)
            report[precision][mode] = probability_agreement(probabilities, reference_maps[mode])
    return report


def forward_times(network, plan):
    """Item 3: seconds per crop at each batch size, and the fastest batch."""
    per_crop = {
        batch: measure.median_seconds(network.timed_forward(batch), plan.warmup_calls, plan.timed_calls) / batch
        for batch in plan.batch_sizes
    }
    fastest = min(per_crop, key=per_crop.get)
    return {"per_crop_s": per_crop, "batch1_s": per_crop[1], "fastest_batch": fastest, "fastest_s": per_crop[fastest]}


def cli_image(checked, plan):
    """The image the CLI modes are timed on: the photo, or a 2048x1024 street-sized one for Cityscapes."""
    image = photo(plan)
    if checked.config.name == STREET_MODEL:
        height, width = plan.street_size
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return image


def cli_times(checked, network, plan, deadline):
    """Item 4: seconds per image of the CLI's prediction (class_map) in each mode, with utilisation."""
    refused = refusal(network.precision)
    if refused:
        return refused
    image = cli_image(checked, plan)
    report = {}
    for mode, flags in CLI_MODES.items():
        if deadline.passed():
            report[mode] = BUDGET_SPENT
            continue
        for _ in range(plan.cli_warmup_calls):
            network.protocol.class_map(image, **flags)
        with UtilisationSampler() as sampler:
            start = time.perf_counter()
            network.protocol.class_map(image, **flags)
            seconds = time.perf_counter() - start
        report[mode] = {
            "image": f"{image.shape[1]}x{image.shape[0]}",
            "passes": network.protocol.forward_count(*image.shape[:2], **flags),
            "seconds": seconds,
            "utilisation": sampler.summary(),
        }
    return report


def check_model(name, work_dir, plan, backend_name, deadline):
    """Every item for one model."""
    checked = prepare_model(name, work_dir, plan)
    peak_since = reset_peak_memory(backend_name)
    networks = {precision: Network(checked, precision) for precision in PRECISIONS}
    result = {
        "crop_size": checked.config.crop_size,
        "parity_vs_opencv": parity(checked, networks["float32"]),
        "precision_vs_float32": precision_report(checked, networks, plan),
        "forward": {
            precision: BUDGET_SPENT if deadline.passed() else forward_times(network, plan)
            for precision, network in networks.items()
        },
        "cli": {precision: cli_times(checked, network, plan, deadline) for precision, network in networks.items()},
    }
    result["peak_memory_bytes"] = peak_memory_bytes(backend_name)
    result["peak_memory_since"] = peak_since if result["peak_memory_bytes"] is not None else None
    return result


def skipped_steps(results, path=()):
    """(step, why) of every step the results say was skipped, each step named by its keys."""
    if not isinstance(results, dict):
        return []
    if set(results) == {"skipped"}:
        return [(" ".join(path), results["skipped"])]
    return [found for key, value in results.items() for found in skipped_steps(value, (*path, str(key)))]


def table_lines(results):
    """The printed table: one line per model and precision, then the steps skipped and why."""
    lines = [
        f"{'model':<22} {'precision':<9} {'parity argmax':>13} {'|dp| vs f32':>11} {'argmax vs f32':>13} "
        f"{'fwd b1 ms':>9} {'best b':>6} {'ms/crop':>8} {'CLI default/-s/-s -ms s':>24} {'peak GiB':>8}"
    ]
    for name, result in results["models"].items():
        for precision, report in result["precision_vs_float32"].items():
            forward = result["forward"][precision]
            cli = result["cli"][precision]
            cli_text = "/".join(f"{cli[m]['seconds']:.2f}" if "seconds" in cli.get(m, {}) else "-" for m in CLI_MODES)
            peak = result["peak_memory_bytes"]
            lines.append(
                f"{name:<22} {precision:<9} {result['parity_vs_opencv']['argmax_agreement']:>13.5f} "
                f"{report['crop']['max_abs_dp']:>11.2e} {report['crop']['argmax_agreement']:>13.5f} "
                f"{1e3 * forward.get('batch1_s', float('nan')):>9.2f} {forward.get('fastest_batch', '-')!s:>6} "
                f"{1e3 * forward.get('fastest_s', float('nan')):>8.2f} {cli_text:>24} "
                f"{(peak or float('nan')) / 2**30:>8.2f}"
            )
    steps_by_reason = {}
    for step, why in skipped_steps(results["models"]):
        steps_by_reason.setdefault(why, []).append(step)
    lines.extend(f"skipped ({why}): {', '.join(steps)}" for why, steps in steps_by_reason.items())
    return lines


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=models.RELEASED_MODEL_NAMES, default=models.RELEASED_MODEL_NAMES)
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds after which remaining timings are skipped (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="folder of the JSON results")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"every step on the CPU with {DRY_RUN.crop_size} px crops, to check the script itself")
    return parser.parse_args(argv)


def main(argv=None):
    """Runs the check; returns the exit code."""
    args = parse_args(argv)
    deadline = Deadline(args.budget_s)
    plan = DRY_RUN if args.dry_run else FULL_RUN
    keras = runtime.import_keras()
    import utils
    from pspnet_keras import backend

    backend_name = runtime.backend_name()
    device = (backend.gpu_names() or ["cpu"])[0]
    results = {
        "device": device,
        "backend": backend_name,
        "framework": backend.framework_version(),
        "keras": keras.__version__,
        "dry_run": args.dry_run,
        "python": platform.python_version(),
        "cpu": measure.cpu_facts(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as work_dir:
        for name in args.models:
            start = time.perf_counter()
            results["models"][name] = check_model(name, work_dir, plan, backend_name, deadline)
            results["models"][name]["seconds"] = time.perf_counter() - start
    slug = "".join(c if c.isalnum() else "_" for c in device.lower()).strip("_")
    out = args.out / f"gpu_{'dry_run_' if args.dry_run else ''}{slug}_{backend_name}.json"
    utils.write_json_atomic(out, results)
    print("\n".join(table_lines(results)))
    print(f"{PROG}: {device} ({results['framework']}, Keras {results['keras']}); results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
