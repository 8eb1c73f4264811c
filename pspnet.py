"""PSPNet semantic segmentation: the Python API and the `pspnet.py` command line.

`PSPNet(model)` builds a released network (models.RELEASED_MODELS) or a user's
model (a weights file with its JSON description beside it, pspnet_keras/models.py), loads its
weights (downloading the published Keras file of a released model when it is
missing) and predicts class probabilities of whole images with the Caffe
release's evaluation protocol (`inference.Predictor`); it lives in
pspnet_keras/segmenter.py and is imported from here.

    python pspnet.py -m pspnet50_ade20k -i photo.jpg -o results/photo.png
    python pspnet.py -w runs/mine/final.h5 -g 'photos/*.jpg' -o results/
    python pspnet.py -g 'photos/*.jpg' -o results/ --ray    # workers on Ray (pspnet_keras/ray_pool.py)
    python pspnet.py -m pspnet101_cityscapes -i drive.mp4 -o results/drive.mp4    # pspnet_keras/video.py

Keras and its backend (TensorFlow, JAX or PyTorch: --backend, KERAS_BACKEND) are
imported only after the command line is parsed, so that `--backend` and `--id`
take effect before they start (runtime.configure, runtime.import_keras).
"""

import pspnet_keras.startup  # noqa: F401 (first: Ctrl-C while the rest imports exits quietly)

import argparse
import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

import utils
from pspnet_keras import cli
from pspnet_keras import compile_cache
from pspnet_keras import download
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras import video
from pspnet_keras.download import WEIGHTS_DIR
from pspnet_keras.download import WEIGHTS_URL_BASE_VARIABLE
from pspnet_keras.segment import SUMMARY_TOP_CLASSES
from pspnet_keras.segment import output_paths
from pspnet_keras.segment import picture_extension_problem
from pspnet_keras.segment import read_input_image
from pspnet_keras.segment import segmentation
from pspnet_keras.segment import summary_lines
from pspnet_keras.segment import write_outputs
from pspnet_keras.segmenter import PSPNet  # noqa: F401 (the Python API: from pspnet import PSPNet)
from pspnet_keras.segmenter import PSPNet50  # noqa: F401
from pspnet_keras.segmenter import PSPNet101  # noqa: F401
from pspnet_keras.segmenter import load_network

PROG = "pspnet.py"
# The picture extension of -g outputs whose input's extension Pillow cannot write.
FALLBACK_PICTURE_EXTENSION = ".png"
# Images are read one at a time ahead of the network (up to two waiting: utils.in_order).
READ_AHEAD_THREADS = 1


def input_paths(args):
    """The image files of the command line: the -i file, or the files matching -g, sorted."""
    if args.input_path is not None:
        return [Path(args.input_path)]
    matches = sorted(glob.glob(args.glob_path, recursive=True))
    if not matches:
        raise cli.CommandError(f"{args.glob_path}: no files match")
    return [Path(match) for match in matches]


def output_plan(args, inputs, videos):
    """The output files of each input: {input path: {kind: output path}}; `videos` are the inputs that
    are videos (video.output_paths), the others images (segment.output_paths).

    With -i, -o gives the stem and the picture or video extension (the input's when -o
    has none). With -g, when -o is an existing directory or ends with a slash, outputs
    go to the -o directory and are named after their input, with its extension.
    Without -o, outputs are written next to their input.
    """
    if args.output_path == "":
        raise cli.CommandError("-o: the output path is empty")
    output = Path(args.output_path) if args.output_path else None
    names_directory = args.output_path is not None and args.output_path.endswith(("/", os.sep))
    into_directory = args.glob_path is not None or names_directory or (output is not None and output.is_dir())
    if output is not None and not into_directory and inputs[0] in videos:
        try:
            extension = video.output_extension(output.suffix, inputs[0])
        except video.VideoError as error:
            raise cli.CommandError(f"{output}: {error}") from None
        return {inputs[0]: video.output_paths(output.with_suffix(""), extension, args.save_ids)}
    if output is not None and not into_directory and output.suffix.lower() in video.CONTAINER_FORMATS:
        raise cli.CommandError(f"{inputs[0]}: {video.not_video_problem(inputs[0])}")
    if output is not None and not into_directory:
        extension = output.suffix or inputs[0].suffix
        problem = picture_extension_problem(extension)
        if problem:
            raise cli.CommandError(f"{output}: {problem}")
        return {inputs[0]: output_paths(output.with_suffix(""), extension, args.save_probs)}
    if output is not None and output.exists() and not output.is_dir():
        raise cli.CommandError(f"{output}: is a file; -o names a directory here")
    plan = {}
    for path in inputs:
        directory = output if output is not None else path.parent
        if path in videos:
            plan[path] = video.output_paths(directory / path.stem, video.output_extension(None, path), args.save_ids)
            continue
        extension = path.suffix if not picture_extension_problem(path.suffix) else FALLBACK_PICTURE_EXTENSION
        plan[path] = output_paths(directory / path.stem, extension, args.save_probs)
    return plan


def check_plan(plan, videos, weights):
    """Refuses a run that would replace an input (an image or a video, the -w weights or the description
    beside them) or a special file, or write one file twice. Outputs of an earlier run are replaced."""
    inputs = cli.Inputs({path: "the input video" if path in videos else "the input image" for path in plan})
    if weights is not None:
        inputs.add(weights, "the weights file")
        inputs.add(models.description_path(weights), "the model description")
    writers = {}
    for source, outputs in plan.items():
        for kind, output in outputs.items():
            resolved = os.path.realpath(output)
            if resolved in writers and writers[resolved] != source:
                raise cli.CommandError(f"{output}: would be written for both {writers[resolved]} and {source}")
            if kind == "ids":
                problem = cli.folder_output_problem(output, video.FrameIdNames(), inputs, overwrite=True)
            else:
                problem = cli.output_problem(output, inputs, overwrite=True)
            if problem:
                raise cli.CommandError(f"{output}: {problem}; choose another -o")
            writers[resolved] = source


def check_output_directories(plan):
    """Refuses output directories that cannot be created or written, before any work."""
    for directory in sorted({output.parent for outputs in plan.values() for output in outputs.values()}):
        problem = cli.directory_problem(directory)
        if problem:
            raise cli.CommandError(f"{directory}: {problem}")


def check_gpu(gpu_id):
    """Warns when the GPU chosen with --id (through CUDA_VISIBLE_DEVICES) does not exist."""
    from pspnet_keras import backend

    if not backend.gpu_names():
        print(f"{PROG}: warning: GPU {gpu_id} not found; running on the CPU", file=sys.stderr)


def backend_line():
    """The backend in use, for -v: 'Keras 3.15.1 on JAX 0.10.2 (KERAS_BACKEND), devices: CPU'."""
    from pspnet_keras import backend

    devices = ", ".join(backend.gpu_names()) or "CPU"
    return (
        f"{PROG}: Keras {backend.keras.version()} on {backend.framework_version()} "
        f"({runtime.backend_source()}), devices: {devices}"
    )


def unfinished(plan, quiet):
    """The images of `plan` missing an output (--skip-existing); says how many are left out unless quiet.

    Outputs are written all or none, so an input whose outputs all exist was segmented.
    """
    left = {source: outputs for source, outputs in plan.items() if not all(map(os.path.exists, outputs.values()))}
    if not quiet and len(left) < len(plan):
        print(
            f"{PROG}: {len(plan) - len(left)} of {len(plan)} images have all their outputs; "
            f"segmenting {len(left)} (--skip-existing)", file=sys.stderr,
        )
    return left


def network(args, config):
    """The PSPNet of the command line (cli.CommandError when it cannot be loaded)."""
    return load_network(config, args.weights, show_progress=not args.quiet, precision=args.precision)


def check_videos(args, videos):
    """Refuses options that apply to images only when the inputs hold videos."""
    if not videos:
        return
    first = sorted(videos)[0]
    if args.ray is not None:
        raise cli.CommandError(f"{first}: is a video; --ray segments images only: run videos without --ray")
    if args.save_probs:
        raise cli.CommandError(f"{first}: is a video; --save-probs writes images' probabilities (use --save-ids)")


def segment_one_video(args, network_of_run, source, outputs):
    """Segments one video into its outputs with network_of_run(); returns whether it was read to its end.
    Says where a video was cut short (its readable frames are written) and, unless quiet, the classes
    found."""
    net = network_of_run()
    end, counts = video.segment_video(
        net, source, outputs, cli.protocol(args), every=args.every, start=args.start, duration=args.duration,
        batch_size=args.batch, quiet=args.quiet, warn=lambda line: tqdm.write(f"{PROG}: warning: {line}", file=sys.stderr),
    )
    if end.cut_short:
        tqdm.write(f"{PROG}: error: {source}: {end.cut_short}; wrote its {end.frames} frames before", file=sys.stderr)
    if not args.quiet:
        found = utils.class_shares(counts, net.class_names)
        for line in summary_lines(f"{source} ({end.frames} frames)", found, args.verbose):
            tqdm.write(line, file=sys.stdout)
    return end.cut_short is None


def read_ahead(plan, videos):
    """(source, outputs, image) for each input of `plan`, in order: the image read (or the
    utils.ImageError of reading it; None for a video), the next ones read in a thread while the
    current one is segmented."""

    def read(item):
        source, outputs = item
        if source in videos:
            return source, outputs, None
        try:
            return source, outputs, read_input_image(source)
        except utils.ImageError as error:
            return source, outputs, error

    return utils.in_order(read, plan.items(), threads=READ_AHEAD_THREADS)


class ImageWrites:
    """The outputs of the segmented images, encoded and written in a thread of their own while the
    next image goes through the network; each image's classes (unless quiet) or error printed once
    it is written, in the order of the images. Leaving the `with` block waits for the writes."""

    def __init__(self, args):
        self.args = args
        self.writer = ThreadPoolExecutor(1)
        self.pending = None
        self.failures = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.writer.shutdown(wait=True)
        return False

    def add(self, source, net, image, outputs, segmented):
        """Writes the outputs of an image's segmentation (segment.segmentation's result) once the image
        before it is written and reported; nothing of it where that report stops the run (a reader of
        stdout gone, Ctrl-C)."""
        files, class_ids, confidence = segmented
        try:
            self.finish()
            written = self.writer.submit(write_outputs, files, image, outputs, class_ids, confidence, net.palette)
        except BaseException:
            files.__exit__(None, None, None)
            raise
        self.pending = source, net, class_ids, written

    def finish(self):
        """Waits for the image being written, then prints its classes or its error."""
        if self.pending is None:
            return
        source, net, class_ids, written = self.pending
        self.pending = None
        try:
            written.result()
        except utils.ImageError as error:
            tqdm.write(f"{PROG}: error: {error}", file=sys.stderr)
            self.failures += 1
            return
        if not self.args.quiet:
            for line in summary_lines(source, utils.class_summary(class_ids, net.class_names), self.args.verbose):
                tqdm.write(line, file=sys.stdout)


def run_on_ray(args, config, plan):
    """Segments the images of `plan` on Ray (pspnet_keras/ray_pool.py); returns the exit code."""
    from pspnet_keras import ray_pool

    try:
        download.weights_to_load(config, args.weights, show_progress=not args.quiet)
    except download.WeightsNotFound as error:
        raise cli.CommandError(str(error)) from None
    try:
        return ray_pool.segment_images(PROG, args, config, plan)
    except ray_pool.RunError as error:
        raise cli.CommandError(str(error)) from None


def run(args):
    """Segments every input image; returns the exit code."""
    try:
        config = models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise cli.CommandError(str(error)) from None
    inputs = input_paths(args)
    videos = {path for path in inputs if video.is_video(path)}
    check_videos(args, videos)
    plan = output_plan(args, inputs, videos)
    check_plan(plan, videos, args.weights)
    check_output_directories(plan)
    if args.skip_existing:
        plan = unfinished(plan, args.quiet)
        if not plan:
            return cli.EXIT_OK
    if args.ray is not None:
        return run_on_ray(args, config, plan)
    if args.id is not None:
        check_gpu(args.id)
    if args.verbose:
        print(backend_line(), file=sys.stderr)
    loaded = []

    def network_of_run():
        if not loaded:
            loaded.append(network(args, config))
        return loaded[0]

    failures = 0
    unit = "file" if videos else "image"
    inputs = tqdm(read_ahead(plan, videos), total=len(plan), unit=unit, disable=args.quiet or len(plan) == 1)
    with ImageWrites(args) as writes:
        for source, outputs, image in inputs:
            try:
                if source in videos:
                    writes.finish()
                    failures += not segment_one_video(args, network_of_run, source, outputs)
                    continue
                if isinstance(image, utils.ImageError):
                    raise image
                net = network_of_run()
                writes.add(source, net, image, outputs, segmentation(net, image, source, outputs, cli.protocol(args),
                                                                     args.quiet))
            except (utils.ImageError, video.VideoError) as error:
                writes.finish()
                tqdm.write(f"{PROG}: error: {error}", file=sys.stderr)
                failures += 1
        writes.finish()
    return cli.EXIT_FAILURE if failures or writes.failures else cli.EXIT_OK


def argument_parser():
    """The parser of the command line, every option documented."""
    parser = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Semantic segmentation with PSPNet, using the Caffe release's evaluation protocol. "
            "For each image it writes <stem>_seg<ext> (class colours), <stem>_seg_blended<ext> "
            "(50/50 blend with the image), <stem>_probs<ext> (maximum probability p as gray level "
            "round(255 p)) and <stem>_seg_read.png (0-based class ids, 8-bit lossless PNG), and "
            "prints the classes found with their pixel shares. Videos: see the 'videos' options."
        ),
        epilog=(
            f"Weights: by default {WEIGHTS_DIR}/<model>.h5 (in the directory of pspnet.py, whatever the "
            "working directory). When that file is missing, the published Keras weights are downloaded "
            f"to it; set {WEIGHTS_URL_BASE_VARIABLE} to download <base>/<model>.h5 from a mirror instead. "
            "weight_converter.py converts the Caffe release's .caffemodel files. A model of your own is "
            "its .h5 with a .json description of the same stem beside it (written by train.py): pass "
            "it with -w and no -m. Long options are also accepted with '-' for '_' and '_' for '-'. "
            "Exit status: 0 when every image and video was segmented, 1 when one of them or the weights "
            "failed or a video was cut short (with -g the other files are still processed), 2 for a "
            "wrong command line, 130 when "
            "interrupted, 143 when terminated; no output file is ever left half written."
        ),
    )
    cli.add_model_arguments(parser)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "-i", "--input_path", metavar="FILE",
        help="the image (any format Pillow reads) or video (any FFmpeg reads, with PyAV) to segment",
    )
    inputs.add_argument(
        "-g", "--glob_path", metavar="PATTERN",
        help="segment every image and video matching this glob pattern (quote it; ** recurses); -o is "
             "then a directory and each output is named after its input, with the input's extension",
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
        help="GPU to run on (sets CUDA_VISIBLE_DEVICES before the backend starts); without a GPU N, "
             "a warning is printed and the CPU is used (default: the backend's choice)",
    )
    cli.add_backend_argument(parser)
    cli.add_cache_argument(parser)
    parser.add_argument(
        "--precision", choices=runtime.PRECISIONS, default="float32",
        help="arithmetic of the network: float32, or bfloat16 / float16 mixed precision (float32 "
             "weights, 16-bit compute) on a GPU; bfloat16 also on a CPU with AVX512_BF16 or AMX on "
             "TensorFlow (about 2x faster there; class ids as float32's at about 98 %% of the pixels, "
             "probabilities within about 1e-2) (default: %(default)s)",
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
    videos = parser.add_argument_group(
        "videos",
        "A video (any container and codec FFmpeg reads, recognised by its content) gives "
        "<stem>_seg_blended<ext> and <stem>_seg<ext>: H.264 videos at the source's frame times, "
        "with its sound (<ext>: -o's, else the input's if .mp4, .m4v, .mov or .mkv, else .mp4).",
    )
    videos.add_argument(
        "--save-ids", action="store_true",
        help="also write <stem>_ids/, one 8-bit lossless PNG of class ids per frame: 000000.png, ...",
    )
    videos.add_argument(
        "--every", type=cli.integer(1), default=1, metavar="N",
        help="segment one frame in N; the frames between repeat its classes (default: every frame)",
    )
    videos.add_argument(
        "--start", type=cli.number(0), default=0.0, metavar="SECONDS",
        help="segment from this time on (the outputs start there) (default: 0)",
    )
    videos.add_argument(
        "--duration", type=cli.number(0, strictly=True), metavar="SECONDS",
        help="segment this many seconds (default: to the end)",
    )
    videos.add_argument(
        "--batch", type=cli.integer(1), metavar="N",
        help="crops per forward pass: the frames of a video (or the crops of -s and -ms) go through the "
             f"network N at a time (default: {video.CPU_BATCH} on a CPU, {video.GPU_BATCH} on a GPU)",
    )
    parser.add_argument(
        "--skip-existing", action="store_true",
        help="leave out the images whose outputs all exist (a rerun of an interrupted -g run goes on "
             "where it stopped)",
    )
    cli.add_ray_arguments(parser)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q", "--quiet", action="store_true",
        help="print errors and warnings only: no progress bars, no class summary",
    )
    verbosity.add_argument(
        "-v", "--verbose", action="store_true",
        help="list every class found in each image with its pixel share (default: the "
             f"{SUMMARY_TOP_CLASSES} largest on one line), name the backend and its devices, and keep "
             "TensorFlow's start-up log lines",
    )
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    cli.check_ray_arguments(parser, args)
    runtime.configure(args.verbose, args.id, args.backend, args.precision)
    if args.no_cache:
        compile_cache.disable()
    cli.check_backend(parser)
    return cli.run_command(PROG, run, args)


if __name__ == "__main__":
    cli.exit_process(main())
