"""A web page to try PSPNet: drop a photo, see its segmentation and the classes found.

    python demo.py                       # http://127.0.0.1:7860, pspnet50_ade20k selected
    python demo.py -m pspnet101_cityscapes --port 8080
    python demo.py -w runs/mine/final.h5  # a model of your own (its .json beside it)

The page is built with Gradio (pip install -r requirements-demo.txt) in
pspnet_keras/page.py; it runs pspnet.py's per-image path on the photo, so its
outputs are the command line's. It works offline: no analytics, no fonts or
scripts from the internet.
"""

import pspnet_keras.startup  # noqa: F401 (first: Ctrl-C while the rest imports exits quietly)

import os
import sys
import tempfile
import time
from pathlib import Path

from pspnet_keras import cli
from pspnet_keras import models
from pspnet_keras import runtime

PROG = "demo.py"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# The largest TCP port number (RFC 793).
MAX_PORT = 65535
EXAMPLE_PHOTOS_DIR = Path(__file__).resolve().parent / "example_images"
EXAMPLE_SUFFIXES = {".jpg", ".png"}
# Seconds between the main thread's checks for Ctrl-C and SIGTERM while the server's threads work: a signal
# the kernel delivers to another thread runs its Python handler only once the main thread runs Python code
# (Python's docs, signal module, "Signals and threads"); a wait without end would never see it.
SIGNAL_POLL_S = 0.5
# The requirements file that installs Gradio, named where it is missing.
GRADIO_REQUIREMENTS = "requirements-demo.txt"


def argument_parser():
    """The parser of the command line, every option documented."""
    parser = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Serves a web page that segments a photo with PSPNet: drop, paste or choose a photo, pick the "
            "model and the protocol, and see the segmentation blended with the photo, each class named on "
            "hover, a legend of the classes found with their pixel shares, the confidence map, and the "
            "class ids and colours to download (the files pspnet.py writes). Models load on first use and "
            "stay loaded; runs are queued, one at a time."
        ),
        epilog=(
            f"Needs Gradio: python -m pip install -r {GRADIO_REQUIREMENTS}. The page fetches nothing from the "
            "internet. Weights as for pspnet.py: a released model's are downloaded on its first photo when "
            "missing. Ctrl-C stops the server. Exit status: 1 when the model or the address is unusable, "
            "2 for a wrong command line, 130 when interrupted, 143 when terminated."
        ),
    )
    cli.add_model_arguments(parser)
    parser.add_argument(
        "--host", default=DEFAULT_HOST,
        help="the address to serve on; 0.0.0.0 serves other machines too (default: %(default)s, this machine only)",
    )
    parser.add_argument(
        "--port", type=cli.integer(1), default=DEFAULT_PORT, help="the port to serve on (default: %(default)s)",
    )
    cli.add_backend_argument(parser)
    return parser


def command_line_model(args):
    """(ModelConfig, weights path or None) of the command line's -m and -w, checked before Gradio loads."""
    try:
        config = models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise cli.CommandError(str(error)) from None
    if args.weights is not None and not os.path.lexists(args.weights):
        raise cli.CommandError(f"{args.weights}: no such weights file")
    return config, args.weights


def run(args):
    """Serves the page until interrupted; returns the exit code."""
    config, weights = command_line_model(args)
    try:
        from pspnet_keras import page
    except ImportError as error:
        raise cli.CommandError(
            f"the page needs Gradio ({error}): python -m pip install -r {GRADIO_REQUIREMENTS}"
        ) from None
    choices = page.model_choices(config, weights)
    with tempfile.TemporaryDirectory(prefix="pspnet-page-") as run_root:
        photos = sorted(path for path in EXAMPLE_PHOTOS_DIR.iterdir() if path.suffix in EXAMPLE_SUFFIXES)
        demo = page.build_page(choices, run_root, photos)
        try:
            url = page.launch(demo, args.host, args.port, allowed_paths=[EXAMPLE_PHOTOS_DIR])
        except OSError as error:
            raise cli.CommandError(
                f"{args.host}:{args.port}: cannot serve there ({error.strerror or error}); choose another --port or --host"
            ) from None
        print(f"{PROG}: serving {next(iter(choices))} and the released models on {url} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(SIGNAL_POLL_S)
        finally:
            demo.close()


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.port > MAX_PORT:
        parser.error(f"argument --port: must be at most {MAX_PORT}, got {args.port}")
    runtime.configure(False, None, args.backend)
    cli.check_backend(parser)
    return cli.run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
