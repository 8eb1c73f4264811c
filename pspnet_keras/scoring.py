"""One sample scored as evaluate.py scores it, and the tally of a run.

`measure_sample` predicts the class ids of a sample's image (or reads the
prediction an earlier run saved) and counts them against its label in a
confusion matrix (metrics.py); `Tally` adds those up with the files that could
not be evaluated. evaluate.py and its Ray workers (ray_pool.py) both use them.

A saved prediction is a PNG of class ids stamped, in two tEXt chunks, with the
SHA-256 of the image file it was predicted from and of the prediction settings
(`prediction_settings`: the model, its weights and the protocol). It is reused
only when both stamps are this run's; otherwise the image is predicted again and
the file replaced.
"""

import functools
import hashlib
import json
import os
import sys
import warnings

import numpy as np
from PIL import Image
from PIL import PngImagePlugin
from tqdm import tqdm

import utils
from pspnet_keras import datasets
from pspnet_keras import metrics

# The tEXt keywords of a saved prediction's stamps (PNG specification, 11.3.4.3: 1-79 Latin-1 characters).
IMAGE_STAMP_KEY = "pspnet-keras image sha256"
SETTINGS_STAMP_KEY = "pspnet-keras settings sha256"
# The fields of a model description that change its predictions (models.ModelConfig.description).
PREDICTING_FIELDS = ("depth", "classes", "crop_size", "base_size", "mean_rgb")


class Tally:
    """What a run has measured so far: the confusion matrix, the evaluated images, the skipped files
    and the label files holding values their layout does not define.

    `prog` names the command in the lines it prints. The lists keep the order in which a single process
    takes the samples: each entry is filed under its sample's place in that order, which is the order
    of the calls unless given.
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


def sha256_hex(data):
    """Hex SHA-256 of `data` (bytes)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    """Hex SHA-256 of the regular file at `path`; OSError when it cannot be read."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@functools.lru_cache(maxsize=8)
def versioned_file_sha256(path, version):
    """file_sha256 of `path`, computed once per `version` (its device, inode, size and mtime)."""
    return file_sha256(path)


def weights_sha256(path):
    """Hex SHA-256 of a weights file, computed once for each version of the file."""
    status = os.stat(path)
    version = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    return versioned_file_sha256(os.path.realpath(path), version)


def prediction_settings(config, weights_path, protocol):
    """What makes a prediction, as predictions.json records it: the model's name, the SHA-256 of the
    description fields that change predictions (PREDICTING_FIELDS, canonical JSON) and of its weights
    file, and the protocol (cli.protocol)."""
    description = config.description()
    predicting = json.dumps({field: description[field] for field in PREDICTING_FIELDS}, sort_keys=True)
    return {
        "model": config.name,
        "model_sha256": sha256_hex(predicting.encode("utf-8")),
        "weights_sha256": weights_sha256(weights_path),
        **protocol,
    }


def settings_stamp(settings):
    """The stamp of prediction settings in a saved prediction: the SHA-256 of their canonical JSON."""
    return sha256_hex(json.dumps(settings, sort_keys=True).encode("utf-8"))


def prediction_stamps(network, sample, protocol):
    """{tEXt keyword: SHA-256} of the prediction of `sample` by `network` with `protocol`: the image
    file's bytes and the prediction settings; SampleError for an image that is no readable file."""
    problem = utils.file_problem(sample.image)
    if problem:
        raise datasets.SampleError(sample.image, problem)
    try:
        image_sha256 = file_sha256(sample.image)
    except OSError as error:
        raise datasets.SampleError(sample.image, f"cannot read ({error.strerror or error})") from None
    settings = prediction_settings(network.config, network.weights_path, protocol)
    return {IMAGE_STAMP_KEY: image_sha256, SETTINGS_STAMP_KEY: settings_stamp(settings)}


def read_saved_prediction(path, shape, classes, stamps):
    """The class ids an earlier run saved at `path` with these `stamps`, or None where there is no such
    file: missing, no PNG, another size or stamp, or a class id of `classes` or above.

    Raises SampleError for a FIFO, device, directory or link loop in its place, which is never opened.
    The stamps and the size are read from the header; only a file that has them is decoded.
    """
    if not os.path.lexists(path):
        return None
    problem = utils.file_problem(path)
    if problem:
        raise datasets.SampleError(path, f"{problem}; remove it or choose another --save-dir")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as saved:
                if not is_stamped_prediction(saved, shape, stamps):
                    return None
                class_ids = np.asarray(saved)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    return None if class_ids.max() >= classes else class_ids


def is_stamped_prediction(saved, shape, stamps):
    """Whether an opened image is an 8-bit PNG of `shape` (H, W) carrying `stamps` in its header."""
    return (
        saved.format == "PNG" and saved.mode == "L" and saved.size == (shape[1], shape[0])
        and all(saved.info.get(key) == value for key, value in stamps.items())
    )


def write_prediction(path, class_ids, stamps):
    """Saves class ids as an 8-bit PNG carrying `stamps` (tEXt chunks), atomically; OutputError when it
    cannot be written."""
    info = PngImagePlugin.PngInfo()
    for key, value in stamps.items():
        info.add_text(key, value)
    image = Image.fromarray(np.asarray(class_ids, np.uint8))

    def save(temporary):
        image.save(temporary, format="PNG", pnginfo=info, **utils.SAVE_OPTIONS["PNG"])

    utils.write_atomic(path, save)


def check_unchanged(sample, image_sha256):
    """Raises SampleError when the image of `sample` no longer has the SHA-256 `image_sha256`, so that
    a prediction is never stamped with the bytes of another version of its image."""
    try:
        unchanged = file_sha256(sample.image) == image_sha256
    except OSError as error:
        raise datasets.SampleError(sample.image, f"cannot read ({error.strerror or error})") from None
    if not unchanged:
        raise datasets.SampleError(sample.image, "image changed while it was evaluated; evaluate it again")


def header_size(path):
    """(width, height) of an image file from its header, or None where Pillow cannot tell."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


def size_problem(sample, width, height, shape):
    """The problem of an image of `width` x `height` whose label is `shape` (H, W)."""
    return f"image is {width}x{height} but its label {sample.label.name} is {shape[1]}x{shape[0]}"


def predict_class_ids(network, sample, shape, protocol):
    """The class id the network predicts at every pixel of `sample`'s image, whose size must be `shape`;
    SampleError for an image that cannot be read, has another size or does not fit in memory. An image
    of another number of pixels than its label is refused from its header, never decoded."""
    # imports TensorFlow: only once a network is there
    from pspnet_keras.inference import OutOfMemory

    problem = utils.file_problem(sample.image)
    size = None if problem else header_size(sample.image)
    if size is not None and size[0] * size[1] != shape[0] * shape[1]:
        raise datasets.SampleError(sample.image, size_problem(sample, *size, shape))
    try:
        image = utils.read_image(sample.image)
    except utils.ImageError as error:
        raise datasets.SampleError(sample.image, str(error).removeprefix(f"{sample.image}: ")) from None
    if image.shape[:2] != shape:
        raise datasets.SampleError(sample.image, size_problem(sample, image.shape[1], image.shape[0], shape))
    try:
        class_ids, _ = network.class_map(image, **protocol)
    except OutOfMemory as error:
        raise datasets.SampleError(sample.image, str(error)) from None
    return class_ids


def measure_sample(network, sample, save_dir, protocol):
    """The confusion matrix of `sample` and its undefined label values, reusing its saved prediction
    when that is stamped with this image and these settings, and saving a new one otherwise;
    SampleError when it cannot be evaluated, OutputError when its prediction cannot be saved."""
    label_ids, undefined = datasets.read_label(sample)
    saved = prediction_path(save_dir, sample) if save_dir else None
    stamps = prediction_stamps(network, sample, protocol) if saved else None
    predicted_ids = read_saved_prediction(saved, label_ids.shape, network.classes, stamps) if saved else None
    if predicted_ids is None:
        predicted_ids = predict_class_ids(network, sample, label_ids.shape, protocol)
        if saved:
            check_unchanged(sample, stamps[IMAGE_STAMP_KEY])
            write_prediction(saved, predicted_ids, stamps)
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
