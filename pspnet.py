"""PSPNet semantic segmentation: the Python API and the `pspnet.py` command line.

`PSPNet(model_name)` builds one of the three released networks, loads its
weights (downloading the published Keras file when it is missing) and predicts
class probabilities of whole images with the Caffe release's evaluation
protocol (`inference.Predictor`).

    python pspnet.py -m pspnet50_ade20k -i photo.jpg -o results/photo.png

TensorFlow is imported only after the command line is parsed, so that `--id`
can choose the GPU before TensorFlow looks for devices.
"""

import argparse
import glob
import http.client
import os
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import utils

# TensorFlow's default CPU allocator maps fresh pages for every large tensor and pays
# a page fault per 4 KiB at each use; its BFC allocator keeps them (bench/README.md).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

PROG = "pspnet.py"
PROJECT_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PROJECT_DIR / "weights" / "keras"

DATASETS = {
    "pspnet50_ade20k": "ade20k",
    "pspnet101_voc2012": "voc2012",
    "pspnet101_cityscapes": "cityscapes",
}
MODEL_NAMES = tuple(DATASETS)
DEFAULT_MODEL = "pspnet50_ade20k"
BASE_SIZES = {"pspnet50_ade20k": 512, "pspnet101_voc2012": 512, "pspnet101_cityscapes": 2048}
PRECISIONS = ("float32", "bfloat16", "float16")

# The published Keras weights (README of the 2017 Keras port).
WEIGHTS_URLS = {
    "pspnet50_ade20k": "https://www.dropbox.com/s/0uxn14y26jcui4v/pspnet50_ade20k.h5?dl=1",
    "pspnet101_cityscapes": "https://www.dropbox.com/s/c17g94n946tpalb/pspnet101_cityscapes.h5?dl=1",
    "pspnet101_voc2012": "https://www.dropbox.com/s/uvqj2cjo4b9c5wg/pspnet101_voc2012.h5?dl=1",
}
# When set, weights are downloaded from <PSPNET_WEIGHTS_URL_BASE>/<model>.h5 instead (a mirror).
WEIGHTS_URL_BASE_VARIABLE = "PSPNET_WEIGHTS_URL_BASE"
# The Caffe release's deploy net and weights of each model, for weight_converter.py.
CAFFE_FILES = {
    "pspnet50_ade20k": ("pspnet50_ADE20K_473.prototxt", "pspnet50_ADE20K.caffemodel"),
    "pspnet101_voc2012": ("pspnet101_VOC2012_473.prototxt", "pspnet101_VOC2012.caffemodel"),
    "pspnet101_cityscapes": ("pspnet101_cityscapes_713.prototxt", "pspnet101_cityscapes.caffemodel"),
}
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_CHUNK_BYTES = 1 << 20

OUTPUT_SUFFIXES = {
    "seg": "_seg{ext}",
    "seg_blended": "_seg_blended{ext}",
    "probs": "_probs{ext}",
    "seg_read": "_seg_read.png",
    "probs_npy": "_probs.npy",
}
FALLBACK_PICTURE_EXTENSION = ".png"
SUMMARY_TOP_CLASSES = 3
# Images needing at least this many forward passes get a progress bar of their own.
FORWARD_BAR_MIN_PASSES = 4
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class WeightsNotFound(FileNotFoundError):
    """Weights that are neither on disk nor downloadable; the message says what to do."""


def default_weights_path(model_name):
    """The weights file `PSPNet` uses for `model_name` unless told otherwise."""
    return WEIGHTS_DIR / f"{model_name}.h5"


def weights_url(model_name):
    """The URL the published weights of `model_name` are downloaded from."""
    base = os.environ.get(WEIGHTS_URL_BASE_VARIABLE)
    if base:
        return f"{base.rstrip('/')}/{model_name}.h5"
    return WEIGHTS_URLS[model_name]


def weights_help(model_name, path):
    """What to do when the weights of `model_name` are not at `path`: place or convert them."""
    prototxt, caffemodel = CAFFE_FILES[model_name]
    return (
        f"Put the published {model_name}.h5 at {path} (or pass its path with -w), "
        f"or convert the Caffe release's weights: "
        f"python {PROJECT_DIR / 'weight_converter.py'} {prototxt} {caffemodel} -o {path}"
    )


def fetch(url, path, description, show_progress):
    """Writes the body of `url` to the new file `path`; raises OSError unless all of it arrived."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with open(path, "xb") as file, tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=description,
            disable=not show_progress,
        ) as bar:
            while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                file.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise OSError(f"transfer interrupted after {received} of {expected} bytes")


def failure_reason(error):
    """A short description of why a download failed."""
    if isinstance(error, urllib.error.HTTPError):
        return str(error)
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error)


def download_weights(model, model_name, path, show_progress=True):
    """Downloads the published weights of `model_name` to `path` and loads them into `model`.

    The file goes to a temporary file next to `path` and is renamed to `path` only
    once it has fully arrived and loads into `model` (HDF5, every layer, every
    shape). On any failure nothing is left behind and WeightsNotFound says where
    to put the file and how to convert it.
    """
    from layers_builder import WeightsError, load_weights

    url = weights_url(model_name)
    if show_progress:
        tqdm.write(f"{PROG}: {path} not found; downloading it from {url}", file=sys.stderr)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fetch(url, temporary, f"downloading {path.name}", show_progress)
        try:
            load_weights(model, temporary)
        except WeightsError:
            raise OSError(f"the downloaded file is not weights of {model_name}") from None
        os.replace(temporary, path)
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise WeightsNotFound(
            f"cannot download the weights of {model_name} from {url}: {failure_reason(error)}. "
            + weights_help(model_name, path)
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


class PSPNet:
    """A released PSPNet with its weights, predicting class probabilities of images.

    `model_name` is one of MODEL_NAMES. `weights` is the path of a Keras-2 HDF5
    weights file; by default `weights/keras/<model_name>.h5` in the directory of
    this file, downloaded from the published URL when missing (`show_progress`
    shows that download's progress bar on stderr). `precision` is float32, or
    bfloat16 / float16 mixed precision on a GPU. Raises WeightsNotFound when
    the weights cannot be found or downloaded, layers_builder.WeightsError
    when they do not fit the network, and ValueError for an unknown model or a
    mixed precision without a GPU.
    """

    def __init__(self, model_name=DEFAULT_MODEL, weights=None, show_progress=True, precision="float32"):
        import tensorflow as tf

        from inference import Predictor
        from layers_builder import MODEL_CONFIGS, build_pspnet, load_weights, split_upsampling

        if model_name not in DATASETS:
            raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(MODEL_NAMES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != "float32" and not tf.config.list_physical_devices("GPU"):
            raise ValueError(f"precision {precision} needs a GPU and none is visible; use float32 on the CPU")
        config = MODEL_CONFIGS[model_name]
        self.model_name = model_name
        self.dataset = DATASETS[model_name]
        self.classes = config["classes"]
        self.crop_size = config["input_size"]
        self.base_size = BASE_SIZES[model_name]
        self.weights_path = Path(weights) if weights is not None else default_weights_path(model_name)
        if weights is not None and not self.weights_path.exists():
            raise WeightsNotFound(f"{self.weights_path}: no such weights file")
        self.precision = precision
        self.model = build_pspnet(model_name, precision=precision)
        if self.weights_path.exists():
            load_weights(self.model, self.weights_path)
        else:
            download_weights(self.model, model_name, self.weights_path, show_progress)
        logits, upsampling = split_upsampling(self.model)
        self.predictor = Predictor(logits, self.crop_size, self.base_size, upsampling)

    def predict(self, img, sliding=False, flip=True, multi_scale=False, progress=None):
        """The (H, W, classes) float32 class probabilities of a uint8 (H, W, 3) RGB image.

        See inference.Predictor.predict for the protocol of each option; `progress`
        is called with the number of forward passes after each crop.
        """
        return self.predictor.predict(img, sliding=sliding, flip=flip, multi_scale=multi_scale, progress=progress)

    def probability_map(self, img, sliding=False, flip=True, multi_scale=False, progress=None):
        """What `predict` returns, as a TensorFlow tensor (no copy to NumPy)."""
        return self.predictor.probability_map(
            img, sliding=sliding, flip=flip, multi_scale=multi_scale, progress=progress
        )

    def forward_count(self, height, width, sliding=False, flip=True, multi_scale=False):
        """The number of forward passes `predict` makes for an image of (height, width)."""
        return self.predictor.forward_count(height, width, sliding=sliding, flip=flip, multi_scale=multi_scale)


def PSPNet50(weights=None, show_progress=True):
    """PSPNet-50 trained on ADE20K (150 classes), as the 2017 port's PSPNet50."""
    return PSPNet("pspnet50_ade20k", weights=weights, show_progress=show_progress)


def PSPNet101(dataset="voc2012", weights=None, show_progress=True):
    """PSPNet-101 trained on `dataset` ('voc2012' or 'cityscapes'), as the 2017 port's PSPNet101."""
    return PSPNet(f"pspnet101_{dataset}", weights=weights, show_progress=show_progress)


class CommandError(Exception):
    """A command that cannot be carried out; the message says why."""


def writable_extension(extension):
    """Whether Pillow can write image files with this extension (e.g. '.jpg')."""
    return Image.registered_extensions().get(extension.lower()) in Image.SAVE


def output_paths(stem, extension, save_probs):
    """The output files of one image, by kind, for the output stem and picture extension."""
    kinds = [kind for kind in OUTPUT_SUFFIXES if save_probs or kind != "probs_npy"]
    return {kind: Path(f"{stem}{OUTPUT_SUFFIXES[kind].format(ext=extension)}") for kind in kinds}


def input_paths(args):
    """The image files of the command line: the -i file, or the files matching -g, sorted."""
    if args.input_path is not None:
        return [Path(args.input_path)]
    matches = sorted(glob.glob(args.glob_path, recursive=True))
    if not matches:
        raise CommandError(f"{args.glob_path}: no files match")
    return [Path(match) for match in matches]


def output_plan(args, inputs):
    """The output files of each input image: {input path: {kind: output path}}.

    With -i, -o gives the stem and the picture extension (the input's when -o has
    none). With -g, or when -o is an existing directory, outputs go to the -o
    directory and are named after their input, with its extension. Without -o,
    outputs are written next to their input.
    """
    output = Path(args.output_path) if args.output_path else None
    into_directory = args.glob_path is not None or (output is not None and output.is_dir())
    if output is not None and not into_directory:
        extension = output.suffix or inputs[0].suffix
        if not writable_extension(extension):
            raise CommandError(f"{output}: cannot write images with the extension {extension!r}")
        return {inputs[0]: output_paths(output.with_suffix(""), extension, args.save_probs)}
    if output is not None and output.exists() and not output.is_dir():
        raise CommandError(f"{output}: is a file; with -g, -o names a directory")
    plan = {}
    for path in inputs:
        directory = output if output is not None else path.parent
        extension = path.suffix if writable_extension(path.suffix) else FALLBACK_PICTURE_EXTENSION
        plan[path] = output_paths(directory / path.stem, extension, args.save_probs)
    return plan


def check_plan(plan):
    """Refuses a run that would overwrite an input image or write one file twice."""
    inputs = {path.resolve(): path for path in plan}
    writers = {}
    for source, outputs in plan.items():
        for output in outputs.values():
            resolved = output.resolve()
            if resolved in inputs:
                raise CommandError(
                    f"{output}: output would overwrite the input image {inputs[resolved]}; choose another -o"
                )
            if resolved in writers and writers[resolved] != source:
                raise CommandError(f"{output}: would be written for both {writers[resolved]} and {source}")
            writers[resolved] = source


def check_output_directories(plan):
    """Refuses output directories that cannot be created or written, before any work."""
    for directory in sorted({output.parent for outputs in plan.values() for output in outputs.values()}):
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise CommandError(f"{directory}: cannot create the output directory ({existing} is not a directory)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CommandError(f"{directory}: cannot write in {existing} (permission denied)")


def summary_lines(source, class_ids, dataset, verbose):
    """The classes found in an image with their pixel shares: one line, or one per class if verbose."""
    found = utils.class_summary(class_ids, dataset)
    if verbose:
        return [f"{source}: {len(found)} classes"] + [
            f"  {class_id:3d} {name:<24} {share:7.2%}" for class_id, name, share in found
        ]
    shown = ", ".join(f"{name} {share:.1%}" for _, name, share in found[:SUMMARY_TOP_CLASSES])
    more = len(found) - SUMMARY_TOP_CLASSES
    return [f"{source}: {shown}" + (f" (+{more} more classes)" if more > 0 else "")]


def write_outputs(outputs, arrays):
    """Writes each output file from its array, atomically; raises ImageError naming a file it cannot write."""
    for kind, path in outputs.items():
        write = utils.write_npy_atomic if kind == "probs_npy" else utils.write_image_atomic
        try:
            write(path, arrays[kind])
        except OSError as error:
            raise utils.ImageError(f"{path}: cannot write ({error.strerror or error})") from None


def segment(net, image, outputs, args):
    """Predicts one image and writes its outputs; returns the class-id map."""
    height, width = image.shape[:2]
    passes = net.forward_count(height, width, sliding=args.sliding, flip=args.flip, multi_scale=args.multi_scale)
    with tqdm(
        total=passes, unit="pass", desc="forward passes", leave=False,
        disable=args.quiet or passes < FORWARD_BAR_MIN_PASSES,
    ) as bar:
        probabilities = net.probability_map(
            image, sliding=args.sliding, flip=args.flip, multi_scale=args.multi_scale, progress=bar.update
        )
    from inference import best_classes

    class_ids, confidence = best_classes(probabilities)
    colour = utils.colorize(class_ids, net.dataset)
    write_outputs(outputs, {
        "seg": colour,
        "seg_blended": utils.blend(image, colour),
        "probs": utils.probability_image(confidence),
        "seg_read": class_ids,
        "probs_npy": np.asarray(probabilities, dtype=np.float32) if "probs_npy" in outputs else None,
    })
    return class_ids


def check_gpu(gpu_id):
    """Warns when the GPU chosen with --id (through CUDA_VISIBLE_DEVICES) does not exist."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        print(f"{PROG}: warning: GPU {gpu_id} not found; running on the CPU", file=sys.stderr)


def load_network(args):
    """The network of the command line."""
    from layers_builder import WeightsError

    try:
        return PSPNet(args.model, weights=args.weights, show_progress=not args.quiet, precision=args.precision)
    except (WeightsError, WeightsNotFound, ValueError) as error:
        raise CommandError(str(error)) from None


def run(args):
    """Segments every input image; returns the exit code."""
    plan = output_plan(args, input_paths(args))
    check_plan(plan)
    check_output_directories(plan)
    if args.id is not None:
        check_gpu(args.id)
    net = None
    failures = 0
    for source, outputs in tqdm(plan.items(), unit="image", disable=args.quiet or len(plan) == 1):
        try:
            image = utils.read_image(source)
            net = net or load_network(args)
            class_ids = segment(net, image, outputs, args)
        except utils.ImageError as error:
            tqdm.write(f"{PROG}: error: {error}", file=sys.stderr)
            failures += 1
            continue
        if not args.quiet:
            for line in summary_lines(source, class_ids, net.dataset, args.verbose):
                tqdm.write(line, file=sys.stdout)
    return EXIT_FAILURE if failures else 0


def argument_parser():
    """The parser of the command line, every option documented."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Semantic segmentation with the released PSPNet models, using the Caffe release's "
            "evaluation protocol. For each image it writes <stem>_seg<ext> (class colours), "
            "<stem>_seg_blended<ext> (50/50 blend with the image), <stem>_probs<ext> (maximum "
            "probability p as gray level round(255 p)) and <stem>_seg_read.png (0-based class ids, "
            "8-bit lossless PNG), and prints the classes found with their pixel shares."
        ),
        epilog=(
            f"Weights: by default {WEIGHTS_DIR}/<model>.h5 (in the directory of pspnet.py, whatever the "
            "working directory). When that file is missing, the published Keras weights are downloaded "
            f"to it; set {WEIGHTS_URL_BASE_VARIABLE} to download <base>/<model>.h5 from a mirror instead. "
            "weight_converter.py converts the Caffe release's .caffemodel files. "
            "Exit status: 0 when every image was segmented, 1 when an image or the weights failed "
            "(with -g the other images are still processed), 2 for a wrong command line."
        ),
    )
    parser.add_argument(
        "-m", "--model", choices=MODEL_NAMES, default=DEFAULT_MODEL, metavar="MODEL",
        help="pspnet50_ade20k (150 ADE20K classes, 473 px crops), pspnet101_voc2012 (21 PASCAL VOC "
             "2012 classes, 473 px) or pspnet101_cityscapes (19 Cityscapes classes, 713 px) "
             "(default: %(default)s)",
    )
    parser.add_argument(
        "-w", "--weights", metavar="H5",
        help="Keras-2 HDF5 weights file (default: weights/keras/<model>.h5 next to pspnet.py, "
             "downloaded when missing)",
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("-i", "--input_path", metavar="IMAGE", help="the image to segment (any format Pillow reads)")
    inputs.add_argument(
        "-g", "--glob_path", metavar="PATTERN",
        help="segment every file matching this glob pattern (quote it; ** recurses); -o is then a "
             "directory and each output is named after its input, with the input's extension",
    )
    parser.add_argument(
        "-o", "--output_path", metavar="PATH",
        help="with -i: output stem and picture extension, e.g. out/photo.png gives out/photo_seg.png "
             "(the input's extension when PATH has none; an existing directory works as with -g); "
             "with -g: output directory. Missing directories are created. "
             "(default: next to each input, named after it)",
    )
    parser.add_argument(
        "--id", metavar="N",
        help="GPU to run on (sets CUDA_VISIBLE_DEVICES before TensorFlow starts); without a GPU N, "
             "a warning is printed and the CPU is used (default: TensorFlow's choice)",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float32",
        help="arithmetic of the network: float32, or bfloat16 / float16 mixed precision (float32 "
             "weights, 16-bit compute; GPU only) (default: %(default)s)",
    )
    parser.add_argument(
        "-s", "--sliding", action="store_true",
        help="single-scale evaluation protocol: longer side scaled to base size + 1 (513, Cityscapes "
             "2049), overlapping crops at stride 2/3 of the crop, averaged (default: one crop with "
             "the longer side scaled to the crop size)",
    )
    parser.add_argument(
        "-ms", "--multi_scale", action="store_true",
        help="multi-scale evaluation protocol: the -s protocol at 0.5, 0.75, 1, 1.25, 1.5 and 1.75 "
             "times the base size, averaged",
    )
    parser.add_argument(
        "-f", "--flip", action=argparse.BooleanOptionalAction, default=True,
        help="add the mirrored logits of each crop's mirror image before the softmax (on by "
             "default; --no-flip turns it off and halves the forward passes)",
    )
    parser.add_argument(
        "--save-probs", action="store_true",
        help="also write <stem>_probs.npy: float32 class probabilities, shape (H, W, classes) at "
             "the image size, each pixel summing to 1",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q", "--quiet", action="store_true",
        help="print errors and warnings only: no progress bars, no class summary",
    )
    verbosity.add_argument(
        "-v", "--verbose", action="store_true",
        help="list every class found in each image with its pixel share (default: the "
             f"{SUMMARY_TOP_CLASSES} largest on one line)",
    )
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    args = argument_parser().parse_args(argv)
    if args.id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.id
    try:
        return run(args)
    except CommandError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
