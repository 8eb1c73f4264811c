"""The weights of the released models: where they are kept and how they are downloaded.

A released model's weights are `weights/keras/<model>.h5` in the project's folder
(beside pspnet.py). When that file is missing, the published Keras weights of the
2017 port are downloaded to it (the Dropbox links of its README, models.py), or
from a mirror named by PSPNET_WEIGHTS_URL_BASE; weight_converter.py converts the
Caffe release's files instead.
"""

import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

import utils

PROJECT_DIR = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = PROJECT_DIR / "weights" / "keras"
CAFFE_WEIGHTS_DIR = PROJECT_DIR / "weights" / "caffe"

# When set, weights are downloaded from <PSPNET_WEIGHTS_URL_BASE>/<model>.h5 instead (a mirror).
WEIGHTS_URL_BASE_VARIABLE = "PSPNET_WEIGHTS_URL_BASE"
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_CHUNK_BYTES = 1 << 20


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
    # imports Keras: only when a download is needed
    from layers_builder import WeightsError
    from layers_builder import load_weights

    url = weights_url(config)
    if show_progress:
        tqdm.write(f"{Path(sys.argv[0]).name}: {path} not found; downloading it from {url}", file=sys.stderr)
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


def weights_to_load(config, weights=None, show_progress=True):
    """The weights file a network of `config` loads: `weights` when given, else the released model's
    (default_weights_path), downloaded first when it is missing and checked by loading it into a
    network of the smallest crop. WeightsNotFound when there is no such file and none can be fetched.

    For the commands that hand the file to other processes (Ray workers) or to their own loader
    (train.py --init), so that a download happens once, here.
    """
    if weights is not None:
        problem = utils.file_problem(weights, what="weights file")
        if problem:
            raise WeightsNotFound(f"{weights}: {problem}")
        return Path(weights)
    path = default_weights_path(config.name)
    if not os.path.lexists(path):
        # imports Keras: only when a download is needed
        from layers_builder import build_pspnet
        from pspnet_keras.models import SMALLEST_CROP_SIZE

        download_weights(build_pspnet(config, SMALLEST_CROP_SIZE, initialized=False), config, path, show_progress)
    return path
