"""Speed of PSPNet training on this machine: a training step against a forward pass, the input pipeline.

    python -m bench.train_speed [--model pspnet50_ade20k] [--crop 473] [--batch 2] [--runs 3] [--json FILE]

With the seeded synthetic weights of the released model (bench/synthetic_caffe.py, converted
by weight_converter.py as the tests do), in one process:

1. The forward pass of the inference network on a batch (training=False), and the
   training step of train.py (`pspnet_keras/training/network.py`, `TrainingModel.train_step`: forward with the
   auxiliary head, the recipe's loss, gradients, CaffeSGD update) on the same batch,
   compiled with tf.function, called in turns (--warmup rounds, then --runs rounds;
   medians). Images/s of the step, and the step / forward ratio.
2. The tf.data pipeline alone (`pspnet_keras/training/data.py`, `training_dataset`: read, augment, batch) on
   --pipeline-images random 640x480 JPEG photographs: images/s it delivers.
3. Fwd+bwd CPU time up to the end of each stage (--stages): where a step's time goes.
4. The peak resident memory of the process (ru_maxrss), which the training step sets.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from datetime import datetime
from datetime import timezone
from pathlib import Path

import numpy as np
from PIL import Image

import layers_builder
from bench import measure
from bench.synthetic_caffe import SyntheticModel
from pspnet_keras import datasets
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.datasets import IGNORE_LABEL
from pspnet_keras.training.data import training_dataset
from pspnet_keras.training.network import build_training_model
from pspnet_keras.training.optimizer import recipe_optimizer

tf = runtime.import_tensorflow()

PROG = "bench/train_speed.py"
INPUT_SEED = 1
PIPELINE_IMAGE_SIZE = (480, 640)
# Stage ends of a PSPNet-50 (layer names), for --stages.
STAGE_ENDS = ("pool1_3x3_s2", "conv2_3_relu", "conv3_4_relu", "conv4_6_relu", "conv5_3_relu", "conv5_4_relu", "conv6")


def synthetic_batch(config, crop, batch):
    """((images, dropout seeds), labels) of `batch` random network inputs and labels."""
    rng = np.random.default_rng(INPUT_SEED)
    images = rng.normal(0, 60, (batch, crop, crop, 3)).astype(np.float32)
    labels = rng.integers(0, config.classes, (batch, crop, crop)).astype(np.uint8)
    labels[:, : crop // 8] = IGNORE_LABEL
    seeds = np.arange(2 * batch, dtype=np.int64).reshape(batch, 2)
    return (tf.constant(images), tf.constant(seeds)), tf.constant(labels)


def step_and_forward(model, network, batch, warmup, runs):
    """Median seconds of the training step and of the forward pass on `batch`, called in turns."""
    (images, _), _ = batch
    step = tf.function(lambda: model.train_step(batch))
    forward = tf.function(lambda: network(images, training=False))
    started = time.perf_counter()
    step()
    first_step = time.perf_counter() - started
    started = time.perf_counter()
    forward()
    first_forward = time.perf_counter() - started
    times = measure.seconds_in_turns(
        {
            "step": lambda: {name: float(value) for name, value in step().items()},
            "forward": lambda: forward().numpy(),
        },
        warmup,
        runs,
    )
    times = {name: statistics.median(values) for name, values in times.items()}
    return times, first_step, first_forward


def pipeline_rate(config, crop, batch, count, warmup_batches=2):
    """Images/s the tf.data pipeline delivers from `count` random 640x480 JPEG photographs."""
    rng = np.random.default_rng(INPUT_SEED)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for index in range(count):
            for folder, suffix in (("images", ".jpg"), ("labels", ".png")):
                (root / folder / "train").mkdir(parents=True, exist_ok=True)
            height, width = PIPELINE_IMAGE_SIZE
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
                root / "images" / "train" / f"{index:04d}.jpg", quality=90
            )
            Image.fromarray(rng.integers(0, config.classes, (height, width), dtype=np.uint8)).save(
                root / "labels" / "train" / f"{index:04d}.png"
            )
        (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(config.classes)) + "\n")
        samples = datasets.open_dataset("folders", root).samples("train")
        dataset = training_dataset(samples, config.mean_rgb, crop, batch, seed=0)
        iterator = iter(dataset)
        for _ in range(warmup_batches):
            next(iterator)
        batches = max(1, count // batch)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * batch / (time.perf_counter() - start)


def stage_times(network, images, runs):
    """[(stage end, forward CPU s, forward + backward CPU s)] of the network cut at each stage end."""
    rows = []
    for name in STAGE_ENDS:
        part = layers_builder.keras.Model(network.input, network.get_layer(name).output)

        @tf.function
        def both(images, part=part):
            with tf.GradientTape() as tape:
                output = part(images, training=True)
                total = tf.reduce_sum(output * output)
            return tape.gradient(total, part.trainable_variables)

        forward = tf.function(lambda images, part=part: part(images, training=False))
        for function in (both, forward):
            function(images)
        cpu = []
        for function in (forward, both):
            start = time.process_time()
            for _ in range(runs):
                tf.nest.map_structure(lambda value: value.numpy(), function(images))
            cpu.append((time.process_time() - start) / runs)
        rows.append((name, cpu[0], cpu[1]))
    return rows


def machine():
    """The machine and software the run measured."""
    return {
        "platform": platform.platform(),
        **measure.cpu_facts(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": layers_builder.keras.__version__,
        "threads": runtime.thread_pool_sizes(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL, choices=models.RELEASED_MODEL_NAMES)
    parser.add_argument("--crop", type=int, help="crop size (default: the model's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="rounds before the timed ones (default: 1)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--train-bn", action="store_true", help="time the step with BN trained")
    parser.add_argument("--pipeline-images", type=int, default=16, help="photographs for the pipeline (0: skip)")
    parser.add_argument("--stages", action="store_true", help="also time fwd+bwd up to each stage end")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    config = models.RELEASED_MODELS[args.model]
    crop = args.crop or config.crop_size
    load = os.getloadavg()
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as directory:
        weights = SyntheticModel(args.model, Path(directory)).converted_h5
        model, network = build_training_model(config, crop, train_bn=args.train_bn)
        layers_builder.load_weights(network, weights)
    model.compile(optimizer=recipe_optimizer(model, iterations=1000), jit_compile=False)
    batch = synthetic_batch(config, crop, args.batch)
    times, first_step, first_forward = step_and_forward(model, network, batch, args.warmup, args.runs)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = {
        "model": args.model,
        "crop": crop,
        "batch": args.batch,
        "train_bn": args.train_bn,
        "step_s": times["step"],
        "forward_s": times["forward"],
        "step_images_per_s": args.batch / times["step"],
        "step_forward_ratio": times["step"] / times["forward"],
        "first_step_s": first_step,
        "first_forward_s": first_forward,
        "peak_rss_mib_after_steps": peak_mib,
        "started": started.isoformat(timespec="seconds"),
        "load_average_start": load,
        "machine": machine(),
    }
    if args.pipeline_images:
        results["pipeline_images_per_s"] = pipeline_rate(config, crop, args.batch, args.pipeline_images)
    if args.stages:
        (images, _), _ = batch
        results["stages"] = [
            {"to": name, "forward_cpu_s": forward, "forward_backward_cpu_s": both}
            for name, forward, both in stage_times(network, images, args.runs)
        ]
    results["load_average_end"] = os.getloadavg()
    print(f"{args.model} at {crop}, batch {args.batch}, BN {'trained' if args.train_bn else 'frozen'}:")
    print(f"  training step   {times['step']:.2f} s  ({results['step_images_per_s']:.3f} images/s)")
    print(f"  forward pass    {times['forward']:.2f} s  (step / forward {results['step_forward_ratio']:.2f})")
    print(f"  first calls     step {first_step:.1f} s, forward {first_forward:.1f} s (tracing)")
    print(f"  peak memory     {peak_mib:.0f} MiB resident")
    if "pipeline_images_per_s" in results:
        print(f"  input pipeline  {results['pipeline_images_per_s']:.1f} images/s (640x480 JPEG, augmented)")
    for row in results.get("stages", []):
        print(f"  to {row['to']:<14} forward {row['forward_cpu_s']:.2f} CPU s, +backward {row['forward_backward_cpu_s']:.2f}")
    print(f"  load average    {load[0]:.2f} at start, {results['load_average_end'][0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
