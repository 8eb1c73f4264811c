"""PSPNet semantic segmentation: the Python API and the `pspnet.py` command line.

`PSPNet(model)` builds a released network (models.RELEASED_MODELS) or a user's
model (a weights file with its JSON description beside it, models.py), loads its
weights (downloading the published Keras file of a released model when it is
missing) and predicts class probabilities of whole images with the Caffe
release's evaluation protocol (`inference.Predictor`).

    python pspnet.py -m pspnet50_ade20k -i photo.jpg -o results/photo.png
    python pspnet.py -w runs/mine/final.h5 -g 'photos/*.jpg' -o results/
    python pspnet.py -g 'photos/*.jpg' -o results/ --ray    # workers on Ray (ray_runner.py)

TensorFlow is imported only after the command line is parsed, so that `--id`
can choose the GPU before TensorFlow looks for devices, and quietly
(tf_runtime.import_tensorflow).
"""

import argparse
import glob
import http.client
import io
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import models
import tf_runtime
import utils

# TensorFlow's default CPU allocator maps fresh pages for every large tensor and pays
# a page fault per 4 KiB at each use; its BFC allocator keeps them (bench/README.md).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

PROG = "pspnet.py"
PROJECT_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PROJECT_DIR / "weights" / "keras"
CAFFE_WEIGHTS_DIR = PROJECT_DIR / "weights" / "caffe"

# When set, weights are downloaded from <PSPNET_WEIGHTS_URL_BASE>/<model>.h5 instead (a mirror).
WEIGHTS_URL_BASE_VARIABLE = "PSPNET_WEIGHTS_URL_BASE"
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_CHUNK_BYTES = 1 << 20

OUTPUT_SUFFIXES = {
    "seg": "_seg{ext}",
    "seg_blended": "_seg_blended{ext}",
    "probs": "_probs{ext}",
    "seg_read": "_seg_read.png",
    "probs_npy": "_probs.npy",
}
# The Pillow image mode of each picture output: colours, blend, grey probabilities.
PICTURE_MODES = {"seg": "RGB", "seg_blended": "RGB", "probs": "L"}
FALLBACK_PICTURE_EXTENSION = ".png"
SUMMARY_TOP_CLASSES = 3
# Images needing at least this many forward passes get a progress bar of their own.
FORWARD_BAR_MIN_PASSES = 4
# The --ray value without an address: an embedded Ray on this machine (ray.init(address="local")).
RAY_LOCAL = "local"


class WeightsNotFound(FileNotFoundError):
    """Weights that are neither on disk nor downloadable; the message says what to do."""


def default_weights_path(model_name):
    """The weights file `PSPNet` uses for a released model unless told otherwise."""
    return WEIGHTS_DIR / f"{model_name}.h5"


def weights_url(config):
    """The URL the published weights of a released model are downloaded from."""
    base = os.environ.get(WEIGHTS_URL_BASE_VARIABLE)
    if base:
        return f"{base.rstrip('/')}/{config.name}.h5"
    return config.weights_url


def weights_help(config, path):
    """What to do when the weights of a released model are not at `path`: place or convert them."""
    return (
        f"Put the published {config.name}.h5 at {path} (or pass its path with -w), "
        f"or convert the Caffe release's weights: put {config.caffe_weights} in {CAFFE_WEIGHTS_DIR} and run "
        f"python {PROJECT_DIR / 'weight_converter.py'} {CAFFE_WEIGHTS_DIR / config.caffe_weights} -o {path}"
    )


def fetch(url, path, description, show_progress):
    """Writes the body of `url` to the file `path`; raises OSError unless all of it arrived."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        with open(path, "wb") as file, tqdm(
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


def download_weights(model, config, path, show_progress=True):
    """Downloads the published weights of a released model to `path` and loads them into `model`.

    The file goes to a temporary file next to `path` and is renamed to `path` only
    once it has fully arrived and loads into `model` (HDF5, every layer, every
    shape). On any failure nothing is left behind and WeightsNotFound says where
    to put the file and how to convert it.
    """
    from layers_builder import WeightsError, load_weights

    url = weights_url(config)
    if show_progress:
        tqdm.write(f"{PROG}: {path} not found; downloading it from {url}", file=sys.stderr)
    try:
        with utils.AtomicFiles() as files:
            temporary = files.temporary(path)
            fetch(url, temporary, f"downloading {path.name}", show_progress)
            try:
                load_weights(model, temporary)
            except WeightsError:
                raise OSError(f"the downloaded file is not weights of {config.name}") from None
            files.commit()
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise WeightsNotFound(
            f"cannot download the weights of {config.name} from {url}: {failure_reason(error)}. "
            + weights_help(config, path)
        ) from None


class PSPNet:
    """A PSPNet with its weights, predicting class probabilities of images.

    `model` is a released model's name (models.RELEASED_MODEL_NAMES, default
    pspnet50_ade20k) or a models.ModelConfig; left out, a `weights` file with a
    JSON description beside it is that user model. `weights` is the path of a
    Keras-2 HDF5 weights file (or a Keras archive written by export.py --format
    keras); for a released model by default
    `weights/keras/<model>.h5` in the directory of this file, downloaded from the
    published URL when missing (`show_progress` shows that download's progress
    bar on stderr). `precision` is float32, or bfloat16 / float16 mixed
    precision on a GPU. Raises WeightsNotFound when the weights cannot be found
    or downloaded, layers_builder.WeightsError when they do not fit the network,
    and ValueError (models.ModelDescriptionError among them) for an unknown
    model, a wrong description or a mixed precision without a GPU.
    """

    def __init__(self, model=None, weights=None, show_progress=True, precision="float32"):
        tf = tf_runtime.import_tensorflow()

        from inference import Predictor
        from layers_builder import build_pspnet, load_keras_archive, load_weights, split_upsampling

        if isinstance(model, models.ModelConfig):
            config = model
        else:
            config = models.resolve_model(model, weights)
        if precision not in tf_runtime.PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(tf_runtime.PRECISIONS)}")
        if precision != "float32" and not tf.config.list_physical_devices("GPU"):
            raise ValueError(f"precision {precision} needs a GPU and none is visible; use float32 on the CPU")
        if weights is None and not config.released:
            raise ValueError(f"{config.name} is not a released model: pass its weights file")
        self.config = config
        self.model_name = config.name
        self.dataset = config.dataset
        self.classes = config.classes
        self.class_names = config.class_names
        self.palette = np.array(config.palette, dtype=np.uint8)
        self.crop_size = config.crop_size
        self.base_size = config.base_size
        self.weights_path = Path(weights) if weights is not None else default_weights_path(config.name)
        if weights is not None and not os.path.lexists(self.weights_path):
            raise WeightsNotFound(f"{self.weights_path}: no such weights file")
        self.precision = precision
        if self.weights_path.suffix.lower() == models.KERAS_ARCHIVE_SUFFIX:
            if precision != "float32":
                raise ValueError(
                    f"{self.weights_path}: a Keras archive holds a float32 network; "
                    f"use precision float32 or the .h5 weights for {precision}"
                )
            self.model = load_keras_archive(self.weights_path, config)
        else:
            self.model = build_pspnet(config, precision=precision)
            if weights is not None or self.weights_path.exists():
                load_weights(self.model, self.weights_path)
            else:
                download_weights(self.model, config, self.weights_path, show_progress)
        logits, upsampling = split_upsampling(self.model)
        self.predictor = Predictor(logits, self.crop_size, self.base_size, upsampling, mean_rgb=config.mean_rgb)

    def predict(self, img, sliding=False, flip=True, multi_scale=False, progress=None):
        """The (H, W, classes) float32 class probabilities of a uint8 (H, W, 3) RGB image.

        See inference.Predictor.predict for the protocol of each option; `progress`
        is called with the number of forward passes after each crop.
        """
        return self.predictor.predict(img, sliding=sliding, flip=flip, multi_scale=multi_scale, progress=progress)

    def class_map(self, img, sliding=False, flip=True, multi_scale=False, progress=None, probabilities=None):
        """The class ids (uint8 (H, W)) and their probabilities (float32 (H, W)) of an image.

        What `predict` gives after argmax and max, computed band by band without the
        whole (H, W, classes) map; `probabilities`, an (H, W, classes) float32 array
        (a memory-mapped .npy, say), is filled with that map on the way.
        """
        return self.predictor.class_map(
            img, sliding=sliding, flip=flip, multi_scale=multi_scale, progress=progress, probabilities=probabilities
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


def picture_extension_problem(extension):
    """Why Pillow cannot write every picture output with this extension (e.g. '.jpg'), or None."""
    image_format = Image.registered_extensions().get(extension.lower())
    if image_format not in Image.SAVE:
        return f"cannot write images with the extension {extension!r}"
    for mode in sorted(set(PICTURE_MODES.values())):
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), format=image_format)
        except (OSError, ValueError, KeyError):
            return f"the {image_format} format of {extension!r} cannot store {mode} images; use .png or .jpg"
    return None


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
        raise utils.CommandError(f"{args.glob_path}: no files match")
    return [Path(match) for match in matches]


def output_plan(args, inputs):
    """The output files of each input image: {input path: {kind: output path}}.

    With -i, -o gives the stem and the picture extension (the input's when -o has
    none). With -g, when -o is an existing directory or ends with a slash, outputs
    go to the -o directory and are named after their input, with its extension.
    Without -o, outputs are written next to their input.
    """
    if args.output_path == "":
        raise utils.CommandError("-o: the output path is empty")
    output = Path(args.output_path) if args.output_path else None
    names_directory = args.output_path is not None and args.output_path.endswith(("/", os.sep))
    into_directory = args.glob_path is not None or names_directory or (output is not None and output.is_dir())
    if output is not None and not into_directory:
        extension = output.suffix or inputs[0].suffix
        problem = picture_extension_problem(extension)
        if problem:
            raise utils.CommandError(f"{output}: {problem}")
        return {inputs[0]: output_paths(output.with_suffix(""), extension, args.save_probs)}
    if output is not None and output.exists() and not output.is_dir():
        raise utils.CommandError(f"{output}: is a file; -o names a directory here")
    plan = {}
    for path in inputs:
        directory = output if output is not None else path.parent
        extension = path.suffix if not picture_extension_problem(path.suffix) else FALLBACK_PICTURE_EXTENSION
        plan[path] = output_paths(directory / path.stem, extension, args.save_probs)
    return plan


def check_plan(plan):
    """Refuses a run that would overwrite an input image, replace a special file or write one file twice."""
    inputs = {os.path.realpath(path): path for path in plan}
    writers = {}
    for source, outputs in plan.items():
        for output in outputs.values():
            resolved = os.path.realpath(output)
            if resolved in inputs:
                raise utils.CommandError(
                    f"{output}: output would overwrite the input image {inputs[resolved]}; choose another -o"
                )
            if resolved in writers and writers[resolved] != source:
                raise utils.CommandError(f"{output}: would be written for both {writers[resolved]} and {source}")
            problem = utils.output_target_problem(output)
            if problem:
                raise utils.CommandError(f"{output}: {problem}")
            writers[resolved] = source


def check_output_directories(plan):
    """Refuses output directories that cannot be created or written, before any work."""
    for directory in sorted({output.parent for outputs in plan.values() for output in outputs.values()}):
        existing = directory
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise utils.CommandError(f"{directory}: cannot create the output directory ({existing} is not a directory)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise utils.CommandError(f"{directory}: cannot write in {existing} (permission denied)")


def summary_lines(source, class_ids, class_names, verbose):
    """The classes found in an image with their pixel shares: one line, or one per class if verbose."""
    found = utils.class_summary(class_ids, class_names)
    if verbose:
        return [f"{source}: {len(found)} classes"] + [
            f"  {class_id:3d} {name:<24} {share:7.2%}" for class_id, name, share in found
        ]
    shown = ", ".join(f"{name} {share:.1%}" for _, name, share in found[:SUMMARY_TOP_CLASSES])
    more = len(found) - SUMMARY_TOP_CLASSES
    return [f"{source}: {shown}" + (f" (+{more} more classes)" if more > 0 else "")]


def mode_name(args):
    """The protocol flags of a run, as a user types them."""
    flags = [flag for flag, on in (("-s", args.sliding), ("-ms", args.multi_scale)) if on]
    return " ".join(flags + ([] if args.flip else ["--no-flip"])) or "the default mode"


def segment(net, image, source, outputs, args):
    """Predicts one image and writes its outputs, all or none; returns the class-id map."""
    from inference import OutOfMemory

    height, width = image.shape[:2]
    protocol = {"sliding": args.sliding, "flip": args.flip, "multi_scale": args.multi_scale}
    passes = net.forward_count(height, width, **protocol)
    with utils.AtomicFiles() as files:
        probabilities = None
        if "probs_npy" in outputs:
            temporary = files.temporary(outputs["probs_npy"])
            probabilities = np.lib.format.open_memmap(
                temporary, mode="w+", dtype=np.float32, shape=(height, width, net.classes)
            )
        with tqdm(
            total=passes, unit="pass", desc="forward passes", leave=False,
            disable=args.quiet or passes < FORWARD_BAR_MIN_PASSES,
        ) as bar:
            try:
                class_ids, confidence = net.class_map(image, progress=bar.update, probabilities=probabilities, **protocol)
            except OutOfMemory as error:
                raise utils.ImageError(f"{source}: {error}") from None
        if probabilities is not None:
            probabilities.flush()
            del probabilities
        colour = utils.colorize(class_ids, net.palette)
        pictures = {
            "seg": colour,
            "seg_blended": utils.blend(image, colour),
            "probs": utils.probability_image(confidence),
            "seg_read": class_ids,
        }
        for kind, array in pictures.items():
            files.write(outputs[kind], utils.image_writer(outputs[kind], array))
        files.commit()
    return class_ids


def check_gpu(gpu_id, verbose):
    """Warns when the GPU chosen with --id (through CUDA_VISIBLE_DEVICES) does not exist."""
    tf = tf_runtime.import_tensorflow(verbose)
    if not tf.config.list_physical_devices("GPU"):
        print(f"{PROG}: warning: GPU {gpu_id} not found; running on the CPU", file=sys.stderr)


def load_network(args, config):
    """The network of the command line."""
    tf_runtime.import_tensorflow(args.verbose)  # quietly, before layers_builder imports it
    from layers_builder import WeightsError

    try:
        return PSPNet(config, weights=args.weights, show_progress=not args.quiet, precision=args.precision)
    except (WeightsError, WeightsNotFound, ValueError) as error:
        raise utils.CommandError(str(error)) from None


def unfinished(plan, quiet):
    """The images of `plan` missing an output (--skip-existing); says how many are left out unless quiet.

    Outputs are written all or none, so an image whose outputs all exist was segmented.
    """
    left = {source: outputs for source, outputs in plan.items() if not all(map(os.path.isfile, outputs.values()))}
    if not quiet and len(left) < len(plan):
        print(
            f"{PROG}: {len(plan) - len(left)} of {len(plan)} images have all their outputs; "
            f"segmenting {len(left)} (--skip-existing)", file=sys.stderr,
        )
    return left


def run_on_ray(args, config, plan):
    """Segments the images of `plan` on Ray (ray_runner); returns the exit code."""
    import ray_runner

    weights = Path(args.weights) if args.weights is not None else default_weights_path(config.name)
    if not weights.exists():
        load_network(args, config)
    try:
        return ray_runner.segment_images(args, config, plan)
    except ray_runner.RunError as error:
        raise utils.CommandError(str(error)) from None


def run(args):
    """Segments every input image; returns the exit code."""
    try:
        config = models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise utils.CommandError(str(error)) from None
    plan = output_plan(args, input_paths(args))
    check_plan(plan)
    check_output_directories(plan)
    if args.skip_existing:
        plan = unfinished(plan, args.quiet)
        if not plan:
            return utils.EXIT_OK
    if args.ray is not None:
        return run_on_ray(args, config, plan)
    if args.id is not None:
        check_gpu(args.id, args.verbose)
    net = None
    failures = 0
    for source, outputs in tqdm(plan.items(), unit="image", disable=args.quiet or len(plan) == 1):
        try:
            image = utils.read_image(source)
            net = net or load_network(args, config)
            class_ids = segment(net, image, source, outputs, args)
        except utils.ImageError as error:
            tqdm.write(f"{PROG}: error: {error}", file=sys.stderr)
            failures += 1
            continue
        if not args.quiet:
            for line in summary_lines(source, class_ids, net.class_names, args.verbose):
                tqdm.write(line, file=sys.stdout)
    return utils.EXIT_FAILURE if failures else utils.EXIT_OK


def add_model_arguments(parser):
    """The -m and -w options of the commands that run a model (pspnet.py, evaluate.py)."""
    parser.add_argument(
        "-m", "--model", choices=models.RELEASED_MODEL_NAMES, metavar="MODEL",
        help=f"a released model: {model_list()} (default: {models.DEFAULT_MODEL}, or the model "
             "described beside the -w file)",
    )
    parser.add_argument(
        "-w", "--weights", metavar="H5",
        help="Keras-2 HDF5 weights file (default: weights/keras/<model>.h5 next to pspnet.py, "
             "downloaded when missing), or a .keras archive written by export.py --format keras; "
             "with <stem>.json beside it, that user model",
    )


def model_list():
    """The released models, one phrase each, for --help."""
    return "; ".join(
        f"{config.name} (ResNet-{config.depth}, {config.classes} {config.dataset} classes, "
        f"{config.crop_size} px crops)"
        for config in models.RELEASED_MODELS.values()
    )


def argument_parser():
    """The parser of the command line, every option documented."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Semantic segmentation with PSPNet, using the Caffe release's evaluation protocol. "
            "For each image it writes <stem>_seg<ext> (class colours), <stem>_seg_blended<ext> "
            "(50/50 blend with the image), <stem>_probs<ext> (maximum probability p as gray level "
            "round(255 p)) and <stem>_seg_read.png (0-based class ids, 8-bit lossless PNG), and "
            "prints the classes found with their pixel shares."
        ),
        epilog=(
            f"Weights: by default {WEIGHTS_DIR}/<model>.h5 (in the directory of pspnet.py, whatever the "
            "working directory). When that file is missing, the published Keras weights are downloaded "
            f"to it; set {WEIGHTS_URL_BASE_VARIABLE} to download <base>/<model>.h5 from a mirror instead. "
            "weight_converter.py converts the Caffe release's .caffemodel files. A model of your own is "
            "its .h5 with a .json description of the same stem beside it (written by train.py): pass "
            "it with -w and no -m. Long options are also accepted with '-' for '_' and '_' for '-'. "
            "Exit status: 0 when every image was segmented, 1 when an image or the weights failed "
            "(with -g the other images are still processed), 2 for a wrong command line, 130 when "
            "interrupted, 143 when terminated; no output file is ever left half written."
        ),
    )
    add_model_arguments(parser)
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
             "(the input's extension when PATH has none; an existing directory, or a PATH ending "
             "in '/', works as with -g); with -g: output directory. Missing directories are created. "
             "(default: next to each input, named after it)",
    )
    parser.add_argument(
        "--id", metavar="N",
        help="GPU to run on (sets CUDA_VISIBLE_DEVICES before TensorFlow starts); without a GPU N, "
             "a warning is printed and the CPU is used (default: TensorFlow's choice)",
    )
    parser.add_argument(
        "--precision", choices=tf_runtime.PRECISIONS, default="float32",
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
             "the image size, each pixel summing to 1 (H x W x classes x 4 bytes on disk)",
    )
    parser.add_argument(
        "--skip-existing", action="store_true",
        help="leave out the images whose outputs all exist (a rerun of an interrupted -g run goes on "
             "where it stopped)",
    )
    add_ray_arguments(parser)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q", "--quiet", action="store_true",
        help="print errors and warnings only: no progress bars, no class summary",
    )
    verbosity.add_argument(
        "-v", "--verbose", action="store_true",
        help="list every class found in each image with its pixel share (default: the "
             f"{SUMMARY_TOP_CLASSES} largest on one line), and keep TensorFlow's start-up log lines",
    )
    return parser


def gpu_count(text):
    """argparse type: a number of GPUs >= 0; a fraction shares a GPU between workers."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_ray_arguments(parser):
    """The options of a run on Ray (ray_runner.py), shared by pspnet.py and evaluate.py."""
    parser.add_argument(
        "--ray", nargs="?", const=RAY_LOCAL, metavar="ADDRESS",
        help="share the images out to workers on Ray, each loading the model once (needs python -m pip "
             "install -r requirements-ray.txt): without ADDRESS an embedded Ray on this machine, one worker "
             "per GPU or CPU workers sized to the cores; 'auto' or HOST:PORT joins a running cluster "
             "(ray start), whose machines see the project, the weights, the images and the outputs at the "
             "same paths",
    )
    parser.add_argument(
        "--workers", type=utils.positive_int, metavar="N",
        help="with --ray: the number of workers (default: one per GPU, or one per 4 cores without GPU)",
    )
    parser.add_argument(
        "--gpus-per-worker", type=gpu_count, metavar="G",
        help="with --ray: each worker's GPUs; 0.5 puts two workers on a GPU (default: 1 where the "
             "cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--cpus-per-worker", type=utils.positive_int, metavar="C",
        help="with --ray: each worker's CPUs, its TensorFlow threads (default: the cores shared out "
             "among the workers)",
    )


def check_ray_arguments(parser, args):
    """Refuses the options of a run on Ray without --ray (exit status 2)."""
    if args.ray is None:
        for flag in ("workers", "gpus_per_worker", "cpus_per_worker"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} needs --ray")


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = argument_parser()
    args = parser.parse_args(utils.canonical_flag_spellings(parser, sys.argv[1:] if argv is None else argv))
    check_ray_arguments(parser, args)
    if args.id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.id
    return utils.run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
