"""What a PSPNet model is: the released models and users' own, as one value type.

A `ModelConfig` holds everything the project needs to know about a model besides
its weights: the ResNet depth, the classes with their names and colours, the crop
and base sizes of the evaluation protocol and the input mean. The three models of
the Caffe release (hszhao/PSPNet, evaluation/eval_all.m and evaluation/prototxt)
are the instances in RELEASED_MODELS; every other module reads their facts from
here.

A user's model (from train.py, or made by hand) is a Keras-2 HDF5 weights file with
a JSON description beside it, same stem, `.json`:

    {"format": "pspnet-keras", "version": 1, "depth": 50, "classes": 5,
     "crop_size": 233, "base_size": 256,
     "class_names": ["background", ...], "palette": [[0, 0, 0], [128, 0, 0], ...]}

`mean_rgb` ([R, G, B]) is optional and defaults to the release's training mean.
"""

import dataclasses
import difflib
import json
import math
import os
from pathlib import Path

import utils
from pspnet_keras import runtime
from pspnet_keras.palettes import ADE20K_CLASSES
from pspnet_keras.palettes import CITYSCAPES_CLASSES
from pspnet_keras.palettes import VOC2012_CLASSES

DESCRIPTION_FORMAT = "pspnet-keras"
DESCRIPTION_VERSION = 1
DEPTHS = (50, 101)
# The mean (R, G, B) the released models were trained with (evaluation/eval_all.m).
RELEASE_MEAN_RGB = (123.68, 116.779, 103.939)
# The architecture of every PSPNet: the dilated ResNet of the paper (section 3.3, output
# stride 8) and its pyramid pooling module (bins 1, 2, 3, 6), with the layer parameters of
# the release's evaluation/prototxt/*.prototxt. layers_builder builds the Keras network and
# caffe_net renders the Caffe deploy net from these same numbers.
BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_DILATIONS = (1, 1, 2, 4)
PYRAMID_BINS = (6, 3, 2, 1)
PYRAMID_CHANNELS = 512
HEAD_CHANNELS = 512
OUTPUT_STRIDE = 8
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.95
DROPOUT_RATE = 0.1
# Class ids are written as 8-bit images, and 255 marks unlabelled pixels in labels.
MAX_CLASSES = 255
# The network's conv5_3 map is 1/8 of the input and is pooled into 6x6 bins exactly.
CROP_SIZE_STEP = 48
CROP_SIZE_OFFSET = 7
SMALLEST_CROP_SIZE = 41
# A description is a few kilobytes (255 class names and colours at most); a larger file is not one.
MAX_DESCRIPTION_BYTES = 1 << 20
# The fields of a description, in the order description() writes them.
DESCRIPTION_FIELDS = (
    "format", "version", "depth", "classes", "crop_size", "base_size", "class_names", "palette", "mean_rgb",
)
# Channels of the widest map the network keeps at 1/8 of its input: conv5's output (section 3.3 of the
# paper; res5c in the release's prototxt).
WIDEST_FEATURE_CHANNELS = 2048
FLOAT32_BYTES = 4


class ModelDescriptionError(ValueError):
    """A model description file that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A PSPNet model: architecture, classes and the inputs its weights expect.

    `crop_size` is the network's input side (48k - 7); `base_size` the longer side
    the sliding-window protocol scales images to. `dataset` names the benchmark a
    released model was trained on; `weights_url` and the Caffe file names exist
    for released models only.
    """

    name: str
    depth: int
    classes: int
    crop_size: int
    base_size: int
    class_names: tuple
    palette: tuple
    mean_rgb: tuple = RELEASE_MEAN_RGB
    dataset: str = None
    weights_url: str = None
    caffe_prototxt: str = None
    caffe_weights: str = None

    @property
    def released(self):
        """Whether this is one of the models of the Caffe release."""
        return self.name in RELEASED_MODELS and RELEASED_MODELS[self.name] is self

    def description(self):
        """This model as the JSON object of a user model's description file."""
        return {
            "format": DESCRIPTION_FORMAT,
            "version": DESCRIPTION_VERSION,
            "depth": self.depth,
            "classes": self.classes,
            "crop_size": self.crop_size,
            "base_size": self.base_size,
            "class_names": list(self.class_names),
            "palette": [list(colour) for colour in self.palette],
            "mean_rgb": list(self.mean_rgb),
        }


def released_model(name, dataset, depth, crop_size, base_size, classes, weights_url, caffe_files):
    """The ModelConfig of a released model, from its dataset's (name, colour) table."""
    return ModelConfig(
        name=name,
        depth=depth,
        classes=len(classes),
        crop_size=crop_size,
        base_size=base_size,
        class_names=tuple(class_name for class_name, _ in classes),
        palette=tuple(colour for _, colour in classes),
        dataset=dataset,
        weights_url=weights_url,
        caffe_prototxt=caffe_files[0],
        caffe_weights=caffe_files[1],
    )


# Weights URLs: the published Keras weights (README of the 2017 Keras port,
# Vladkryvoruchko/PSPNet-Keras-tensorflow). Caffe files: the release's
# evaluation/prototxt and the caffemodels its README links.
RELEASED_MODELS = {
    config.name: config
    for config in (
        released_model(
            "pspnet50_ade20k", "ade20k", 50, 473, 512, ADE20K_CLASSES,
            "https://www.dropbox.com/s/0uxn14y26jcui4v/pspnet50_ade20k.h5?dl=1",
            ("pspnet50_ADE20K_473.prototxt", "pspnet50_ADE20K.caffemodel"),
        ),
        released_model(
            "pspnet101_voc2012", "voc2012", 101, 473, 512, VOC2012_CLASSES,
            "https://www.dropbox.com/s/uvqj2cjo4b9c5wg/pspnet101_voc2012.h5?dl=1",
            ("pspnet101_VOC2012_473.prototxt", "pspnet101_VOC2012.caffemodel"),
        ),
        released_model(
            "pspnet101_cityscapes", "cityscapes", 101, 713, 2048, CITYSCAPES_CLASSES,
            "https://www.dropbox.com/s/c17g94n946tpalb/pspnet101_cityscapes.h5?dl=1",
            ("pspnet101_cityscapes_713.prototxt", "pspnet101_cityscapes.caffemodel"),
        ),
    )
}
RELEASED_MODEL_NAMES = tuple(RELEASED_MODELS)
DEFAULT_MODEL = "pspnet50_ade20k"


def feature_size(input_size):
    """The side of the conv5_3 feature map for a square input of side `input_size`."""
    stem = (input_size - 1) // 2 + 1
    pooled = -(-(stem - 1) // 2) + 1
    return (pooled - 1) // 2 + 1


def nearest_crop_sizes(size):
    """The two supported crop sizes (48k - 7) around `size`."""
    below = max(SMALLEST_CROP_SIZE, CROP_SIZE_STEP * ((size + CROP_SIZE_OFFSET) // CROP_SIZE_STEP) - CROP_SIZE_OFFSET)
    return below, below + CROP_SIZE_STEP


def is_crop_size(size):
    """Whether the network is the released network scaled at this input side (48k - 7)."""
    return size >= SMALLEST_CROP_SIZE and (size + CROP_SIZE_OFFSET) % CROP_SIZE_STEP == 0


def crop_size_problem(size):
    """Why `size` is not a supported crop size, or None when it is."""
    if is_crop_size(size):
        return None
    below, above = nearest_crop_sizes(size)
    return f"{size} is not a supported crop size: PSPNet needs 48k - 7 (for example {below} or {above})"


def released_description_of(path):
    """Whether the JSON at `path` is a Keras-2 model config (the 2017 port's published .json); only a
    readable regular file of at most MAX_DESCRIPTION_BYTES is read."""
    try:
        data = json.loads(description_text(path))
    except (ModelDescriptionError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "class_name" in data and "config" in data and "format" not in data


# A network saved whole by keras.saving.save_model; keras.saving.load_model tells it by this extension.
KERAS_ARCHIVE_SUFFIX = ".keras"


def description_path(weights_path):
    """The JSON description that belongs to a weights file: same stem, `.json`."""
    return Path(weights_path).with_suffix(".json")


def field_error(path, field, problem):
    """A ModelDescriptionError naming the file and the field."""
    return ModelDescriptionError(f"{path}: field '{field}' {problem}")


def integer_field(data, path, field, allowed=None, minimum=1):
    """An integer field of a description, checked."""
    value = data.get(field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(path, field, f"must be an integer, not {json.dumps(value)[:40]}")
    if allowed is not None and value not in allowed:
        raise field_error(path, field, f"must be one of {', '.join(map(str, allowed))}, not {value}")
    if value < minimum:
        raise field_error(path, field, f"must be at least {minimum}, not {value}")
    return value


def names_field(data, path, classes):
    """The class names of a description, one non-empty string per class."""
    names = data.get("class_names")
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        raise field_error(path, "class_names", "must be a list of non-empty strings")
    if len(names) != classes:
        raise field_error(path, "class_names", f"has {len(names)} names for {classes} classes")
    return tuple(names)


def colour_triples(value, length):
    """`value` as a tuple of `length` (R, G, B) triples of 0..255 integers, or None if it is not one."""
    if not isinstance(value, list) or len(value) != length:
        return None
    triples = []
    for colour in value:
        if not (
            isinstance(colour, list)
            and len(colour) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)
        ):
            return None
        triples.append(tuple(colour))
    return tuple(triples)


def mean_field(data, path):
    """The input mean of a description: three finite numbers, the release's by default."""
    mean = data.get("mean_rgb", list(RELEASE_MEAN_RGB))
    if not (
        isinstance(mean, list)
        and len(mean) == 3
        and all(isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) for m in mean)
    ):
        raise field_error(path, "mean_rgb", "must be three numbers [R, G, B]")
    return tuple(float(m) for m in mean)


def forward_pass_bytes(crop_size, classes):
    """A lower bound of the memory one forward pass of a crop takes: the float32 input crop, conv5's
    map at 1/8 of it and the logits at full size, each held at least once."""
    features = feature_size(crop_size) ** 2 * WIDEST_FEATURE_CHANNELS
    return FLOAT32_BYTES * (crop_size * crop_size * (3 + classes) + features)


def size_problem(path, crop_size, base_size, classes):
    """Why a model of these sizes cannot run on this machine, or None: one forward pass of a crop, and
    an image scaled to `base_size` x `base_size` by the sliding-window protocol (float32 RGB), must fit."""
    problem = runtime.allocation_problem(forward_pass_bytes(crop_size, classes), f"a forward pass of {crop_size} px")
    if problem:
        return field_error(path, "crop_size", f"{crop_size}: {problem}")
    problem = runtime.allocation_problem(
        FLOAT32_BYTES * 3 * base_size * base_size, f"an image scaled to {base_size} x {base_size}"
    )
    if problem:
        return field_error(path, "base_size", f"{base_size}: {problem}")
    return None


def unknown_fields_problem(data, path):
    """A ModelDescriptionError naming the first field that is not a description's (a misspelling, say),
    or None."""
    unknown = [field for field in data if field not in DESCRIPTION_FIELDS]
    if not unknown:
        return None
    close = difflib.get_close_matches(unknown[0], DESCRIPTION_FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (the fields are {', '.join(DESCRIPTION_FIELDS)})"
    return field_error(path, unknown[0][:40], f"is not a field of a model description{hint}")


def config_from_description(data, path, name):
    """The ModelConfig a description's JSON object gives; ModelDescriptionError naming the field otherwise.

    Every field is checked, unknown ones are refused, and the sizes must fit in this machine's memory.
    """
    if not isinstance(data, dict):
        raise ModelDescriptionError(f"{path}: not a model description (a JSON object is expected)")
    problem = unknown_fields_problem(data, path)
    if problem:
        raise problem
    if data.get("format") != DESCRIPTION_FORMAT:
        raise field_error(path, "format", f"must be \"{DESCRIPTION_FORMAT}\"")
    if data.get("version") != DESCRIPTION_VERSION:
        raise field_error(path, "version", f"must be {DESCRIPTION_VERSION} (this version of the project reads 1)")
    depth = integer_field(data, path, "depth", allowed=DEPTHS)
    classes = integer_field(data, path, "classes")
    if classes > MAX_CLASSES:
        raise field_error(path, "classes", f"must be at most {MAX_CLASSES}, not {classes}")
    crop_size = integer_field(data, path, "crop_size")
    problem = crop_size_problem(crop_size)
    if problem:
        raise field_error(path, "crop_size", problem.removeprefix(f"{crop_size} "))
    base_size = integer_field(data, path, "base_size")
    class_names = names_field(data, path, classes)
    palette = colour_triples(data.get("palette"), classes)
    if palette is None:
        raise field_error(path, "palette", f"must be {classes} colours [R, G, B], each value an integer 0-255")
    problem = size_problem(path, crop_size, base_size, classes)
    if problem:
        raise problem
    return ModelConfig(
        name=name,
        depth=depth,
        classes=classes,
        crop_size=crop_size,
        base_size=base_size,
        class_names=class_names,
        palette=palette,
        mean_rgb=mean_field(data, path),
    )


def description_text(path):
    """The text of the description file at `path`: a readable regular file of at most
    MAX_DESCRIPTION_BYTES, in UTF-8; ModelDescriptionError naming the file otherwise."""
    try:
        content = utils.read_small_file(path, MAX_DESCRIPTION_BYTES, "a model description")
    except utils.FileError as error:
        raise ModelDescriptionError(str(error)) from None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelDescriptionError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_description(path):
    """The ModelConfig described by the JSON file at `path`, named after its stem.

    Raises ModelDescriptionError naming the file, and the field where one is wrong.
    """
    path = Path(path)
    text = description_text(path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise ModelDescriptionError(f"{path}: JSON nested too deeply for a model description") from None
    except ValueError as error:
        raise ModelDescriptionError(f"{path}: not valid JSON ({str(error)[:80]})") from None
    return config_from_description(data, path, path.stem)


def model_of_weights(weights_path):
    """The user model a weights file is, from the description beside it; None when there is none.

    A Keras-2 model config beside the file (the 2017 port published one beside each
    released `.h5`) is not a description and is ignored. Whatever is beside it is
    checked before it is opened: a FIFO or a device there is ModelDescriptionError.
    """
    path = description_path(weights_path)
    if not os.path.lexists(path):
        return None
    if released_description_of(path):
        return None
    return read_description(path)


def resolve_model(model=None, weights=None):
    """The ModelConfig of a command line's `-m` and `-w`.

    A `-w` with a description beside it is that user model; `-m` must then be
    absent. Otherwise `-m` names a released model (default DEFAULT_MODEL). Raises
    ModelDescriptionError (a ValueError) with one line saying what is wrong.
    """
    if weights is not None and os.fspath(weights).lower().endswith(".json"):
        if released_description_of(weights):
            raise ModelDescriptionError(
                f"{weights}: a Keras-2 model config; the architecture is built in code, "
                "pass the weights (.h5) with -w instead"
            )
        raise ModelDescriptionError(f"{weights}: a model description; pass the weights (.h5) beside it with -w")
    user_model = model_of_weights(weights) if weights is not None else None
    if user_model is not None:
        if model is not None:
            raise ModelDescriptionError(
                f"{weights}: is the user model described in {description_path(weights)}; "
                f"leave out -m {model} (it names a released model)"
            )
        return user_model
    name = model or DEFAULT_MODEL
    if name not in RELEASED_MODELS:
        raise ModelDescriptionError(f"unknown model {name!r}; choose one of {', '.join(RELEASED_MODEL_NAMES)}")
    return RELEASED_MODELS[name]


def model_config(model):
    """A ModelConfig, given one or the name of a released model."""
    if isinstance(model, ModelConfig):
        return model
    if model not in RELEASED_MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(RELEASED_MODEL_NAMES)}")
    return RELEASED_MODELS[model]
