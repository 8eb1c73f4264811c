"""One sample scored as evaluate.py scores it, and the tally of a run.

`measure_sample` predicts the class ids of a sample's image (or reads the
prediction an earlier run saved) and counts them against its label in a
confusion matrix (metrics.py); `Tally` adds those up with the files that could
not be evaluated. evaluate.py and its Ray workers (ray_pool.py) both use them.
"""

import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

import utils
from pspnet_keras import datasets
from pspnet_keras import metrics


class Tally:
    """What a run has measured so far: the confusion matrix, the evaluated images, the skipped files
    and the label files holding values their layout does not define.

    `prog` names the command in the lines it prints. The lists keep the order in which a single process takes the samples: each entry is filed
    under its sample's place in that order, which is the order of the calls unless given.
    """

    def __init__(self, classes, prog):
        self.prog = prog
        self.confusion = np.zeros((classes, classes), np.int64)
        self.images = 0
        self.places = {"skipped": [], "undefined_labels": []}

    @property
    def skipped(self):
        """The files that could not be evaluated: [{"file", "problem"}], in sample order."""
        return self.in_order("skipped")

    @property
    def undefined_labels(self):
        """The label files holding undefined values: [{"file", "values"}], in sample order."""
        return self.in_order("undefined_labels")

    def in_order(self, kind):
        """The entries of one list, by the place of their sample."""
        return [entry for _, entry in sorted(self.places[kind], key=lambda filed: filed[0])]

    def next_place(self):
        """The place of a sample counted now, when the caller does not give one."""
        return self.images + len(self.places["skipped"])

    def add(self, sample, confusion, undefined, place=None):
        """Counts one evaluated image by its confusion matrix, and reports on stderr label values its
        layout does not define."""
        place = self.next_place() if place is None else place
        self.confusion += confusion
        self.images += 1
        if undefined:
            tqdm.write(f"{self.prog}: warning: {datasets.undefined_values_problem(sample, undefined)}", file=sys.stderr)
            self.places["undefined_labels"].append((place, {"file": str(sample.label), "values": list(undefined)}))

    def skip(self, error, place=None):
        """Records, and reports on stderr, a file that could not be evaluated."""
        place = self.next_place() if place is None else place
        tqdm.write(f"{self.prog}: skipped {error.path}: {error.problem}", file=sys.stderr)
        self.places["skipped"].append((place, {"file": str(error.path), "problem": error.problem}))


def prediction_path(save_dir, sample):
    """Where the prediction of `sample` is kept: <save dir>/<image stem>.png."""
    return save_dir / f"{sample.image.stem}.png"


def read_saved_prediction(path, shape, classes):
    """The class ids an earlier run saved at `path`, or None where there is no usable file.

    Raises SampleError for a FIFO, directory or link loop in its place, which is never opened.
    """
    if not os.path.lexists(path):
        return None
    problem = utils.file_problem(path)
    if problem:
        raise datasets.SampleError(path, f"{problem}; remove it or choose another --save-dir")
    try:
        with Image.open(path) as saved:
            class_ids = np.asarray(saved) if saved.mode == "L" else None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    if class_ids is None or class_ids.shape != shape or class_ids.max() >= classes:
        return None
    return class_ids


def predict_class_ids(network, sample, shape, protocol):
    """The class id the network predicts at every pixel of `sample`'s image, whose size must be `shape`;
    SampleError for an image that cannot be read, has another size or does not fit in memory."""
    # imports TensorFlow: only once a network is there
    from pspnet_keras.inference import OutOfMemory

    try:
        image = utils.read_image(sample.image)
    except utils.ImageError as error:
        raise datasets.SampleError(sample.image, str(error).removeprefix(f"{sample.image}: ")) from None
    if image.shape[:2] != shape:
        raise datasets.SampleError(
            sample.image,
            f"image is {image.shape[1]}x{image.shape[0]} but its label {sample.label.name} is {shape[1]}x{shape[0]}",
        )
    try:
        class_ids, _ = network.class_map(image, **protocol)
    except OutOfMemory as error:
        raise datasets.SampleError(sample.image, str(error)) from None
    return class_ids


def measure_sample(network, sample, save_dir, protocol):
    """The confusion matrix of `sample` and its undefined label values, reusing its saved prediction
    when there is one and saving a new one otherwise; SampleError when it cannot be evaluated."""
    label_ids, undefined = datasets.read_label(sample)
    saved = prediction_path(save_dir, sample) if save_dir else None
    predicted_ids = read_saved_prediction(saved, label_ids.shape, network.classes) if saved else None
    if predicted_ids is None:
        predicted_ids = predict_class_ids(network, sample, label_ids.shape, protocol)
        if saved:
            utils.write_image_atomic(saved, predicted_ids)
    return metrics.confusion_matrix(label_ids, predicted_ids, network.classes), undefined


def evaluate_sample(network, sample, save_dir, protocol, tally):
    """Adds `sample` to `tally`, or records why it was skipped."""
    try:
        confusion, undefined = measure_sample(network, sample, save_dir, protocol)
    except datasets.SampleError as error:
        tally.skip(error)
        return
    tally.add(sample, confusion, undefined)


def prediction_groups(samples, save_dir):
    """The numbers of the samples with a saved prediction and of the others, the order a run takes them in."""
    saved, to_predict = [], []
    for index, sample in enumerate(samples):
        has_saved = save_dir is not None and prediction_path(save_dir, sample).is_file()
        (saved if has_saved else to_predict).append(index)
    return saved, to_predict


def evaluate_samples(network, samples, save_dir, protocol, tally):
    """Adds every sample to `tally`: first those with a saved prediction, then the others,
    each group with its own progress bar so that the ETA reflects the predictions left."""
    saved, to_predict = prediction_groups(samples, save_dir)
    for description, group in (("saved predictions", saved), ("predicting", to_predict)):
        if group:
            for index in tqdm(group, desc=description, unit="img", dynamic_ncols=True):
                evaluate_sample(network, samples[index], save_dir, protocol, tally)
