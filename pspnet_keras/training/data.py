"""The training data: the samples' check before a run, their order, and the tf.data pipeline
of augmented batches over the replicas of a distribution strategy.

Training is a function of the seed and the data alone: the order of the samples,
every augmentation and every dropout mask are drawn, statelessly, from the seed and
the sample's position in the order. Resuming a run, or splitting its batches over
more replicas, computes the same thing.
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pspnet_keras import runtime

tf = runtime.import_tensorflow()

from tqdm import tqdm

import utils
from pspnet_keras import datasets
from pspnet_keras.training.augment import augment

CHECK_THREADS = max(1, min(8, os.cpu_count() or 1))


class SampleReader:
    """Sample i of a list as (uint8 RGB image, uint8 class ids with IGNORE_LABEL unlabelled).

    Images are read as pspnet.py and evaluate.py read them (utils.read_image), labels
    by datasets.read_label. Raises datasets.SampleError for a file that cannot be used.
    """

    def __init__(self, samples):
        self.samples = samples

    def __call__(self, index):
        sample = self.samples[int(index)]
        try:
            image = utils.read_image(sample.image)
        except utils.ImageError as error:
            raise datasets.SampleError(sample.image, str(error).removeprefix(f"{sample.image}: ")) from None
        label, _ = datasets.read_label(sample)
        if label.shape != image.shape[:2]:
            raise datasets.SampleError(sample.label, size_problem(label.shape, image.shape, sample.image))
        return image, label


def size_problem(label_shape, image_shape, image_path):
    """What a label whose size differs from its image's is, in words."""
    return (
        f"label is {label_shape[1]}x{label_shape[0]} but its image {Path(image_path).name} "
        f"is {image_shape[1]}x{image_shape[0]}"
    )


def sample_order(count, seed, start_position=0):
    """(position, sample index) pairs from `start_position` on, without end.

    Position p is the p-th sample the run takes; epoch e (positions e*count ..
    (e+1)*count - 1) visits the samples in the permutation drawn from (seed, e).
    """
    first_epoch = start_position // count

    def epoch(number):
        positions = tf.data.Dataset.range(number * count, (number + 1) * count)
        permutation = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), tf.stack([tf.constant(seed, tf.int64), number])
        )
        return tf.data.Dataset.zip(positions, tf.data.Dataset.from_tensor_slices(permutation))

    return tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(start_position - first_epoch * count)


def training_dataset(
    samples, mean_rgb, crop_size, global_batch, seed, start_iteration=0, pipeline=0, pipelines=1, replica_batch=None
):
    """The tf.data pipeline of training batches ((images, dropout seeds), labels), without end.

    Step i of the run takes positions i*global_batch .. (i+1)*global_batch - 1 of
    sample_order. Input pipeline `pipeline` of `pipelines` (one per worker) reads
    its share of each step's positions, in order, in batches of `replica_batch`
    (default: the whole share), one per local replica. Images are read and
    augmented in parallel (AUTOTUNE), in a fixed order, and prefetched.
    """
    share = global_batch // pipelines
    replica_batch = replica_batch or share
    reader = SampleReader(samples)
    mean = tf.constant(mean_rgb, tf.float32)
    base_seed = tf.constant(seed, tf.int64)

    def for_this_pipeline(position, index):
        """Whether the sample at `position` of the order falls in this pipeline's share of its batch."""
        return tf.equal((position % global_batch) // share, pipeline)

    def example(position, index):
        image, label = tf.numpy_function(reader, [index], (tf.uint8, tf.uint8), stateful=False)
        image.set_shape((None, None, 3))
        label.set_shape((None, None))
        augmentation_seed, dropout_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.stack([base_seed, position]), 2)
        )
        image, label = augment(tf.cast(image, tf.float32) - mean, label, augmentation_seed, crop_size)
        return (image, dropout_seed), label

    dataset = sample_order(len(samples), seed, start_iteration * global_batch).filter(for_this_pipeline)
    dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(replica_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def distributed_dataset(strategy, samples, mean_rgb, crop_size, global_batch, seed, start_iteration=0):
    """training_dataset for every input pipeline of `strategy`, the global batch split over its replicas."""

    def dataset_function(context):
        return training_dataset(
            samples, mean_rgb, crop_size, global_batch, seed, start_iteration,
            pipeline=context.input_pipeline_id, pipelines=context.num_input_pipelines,
            replica_batch=context.get_per_replica_batch_size(global_batch),
        )

    return strategy.distribute_datasets_from_function(dataset_function)


def sample_problems(sample):
    """(problems, labelled pixels) of one sample: its problems one line each (file: problem), an
    unreadable image, a missing or unreadable label, a label of another size, label values neither a
    class nor unlabelled; and the number of its label's pixels that hold a class (0 when unreadable)."""
    problems = []
    image = None
    try:
        image = utils.read_image(sample.image)
    except utils.ImageError as error:
        problems.append(f"unreadable image: {error}")
    try:
        label, undefined = datasets.read_label(sample)
    except datasets.SampleError as error:
        problem = "missing label" if error.problem == "label file missing" else error.problem
        return problems + [f"{error.path}: {problem}"], 0
    if image is not None and label.shape != image.shape[:2]:
        problems.append(f"{sample.label}: {size_problem(label.shape, image.shape, sample.image)}")
    if undefined:
        shown = ", ".join(map(str, undefined[: datasets.LISTED_VALUES]))
        more = f" and {len(undefined) - datasets.LISTED_VALUES} more" if len(undefined) > datasets.LISTED_VALUES else ""
        problems.append(
            f"{sample.label}: label values {shown}{more} are neither a class nor unlabelled "
            f"(this layout defines {sample.coding.defined_values()})"
        )
    return problems, int(np.count_nonzero(label != datasets.IGNORE_LABEL))


def check_samples(samples, description="checking", quiet=False):
    """({sample: [problem lines]} of the samples that cannot be trained on, the number of labelled
    pixels of the others), after reading every one.

    The files are read in CHECK_THREADS threads with a progress bar (none if `quiet`).
    A set whose labelled pixels are 0 (every label value unlabelled) has nothing to learn.
    """
    problems = {}
    labelled = 0
    with ThreadPoolExecutor(CHECK_THREADS) as pool, tqdm(
        total=len(samples), desc=description, unit="img", disable=quiet, leave=False, dynamic_ncols=True
    ) as bar:
        for sample, (found, pixels) in zip(samples, pool.map(sample_problems, samples)):
            if found:
                problems[sample] = found
            else:
                labelled += pixels
            bar.update()
    return problems, labelled


def samples_fingerprint(samples, root):
    """A digest of the ordered list of samples (paths relative to the root), which fixes the data order."""
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image, sample.label):
            digest.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
    return digest.hexdigest()
