"""The Keras-2 HDF5 weights layout of the published PSPNet models: reading and writing.

Keras-2 `save_weights` files (the published `.h5` of the 2017 Keras port, and what
weight_converter.py and train.py write): a root `layer_names` attribute, one group
per weighted layer with a `weight_names` attribute, and datasets named
`<layer>/<weight>:0` (Conv2D kernel HWIO and bias; BatchNormalization gamma, beta,
moving_mean, moving_variance). Full-model files nest the same under `model_weights`.
Needs h5py and NumPy only, so that the converter runs without TensorFlow.
"""

import os

import h5py
import numpy as np
from tqdm import tqdm

import utils

# Root attributes of the Keras-2 weights files the published models come in.
KERAS2_BACKEND = np.bytes_(b"tensorflow")
KERAS2_VERSION = np.bytes_(b"2.1.5")


# A layer of ResNet-101's stage 4 that ResNet-50 does not have (23 blocks against 6, section 4 of the
# paper; the release's prototxt names).
RESNET101_ONLY_LAYER = "conv4_23_1x1_reduce"


class WeightsError(ValueError):
    """A weights file that does not fit the network it is loaded into."""


def weights_layout(arrays):
    """(ResNet depth, classes) of a PSPNet's weights (read_weights' arrays); classes None without conv6."""
    conv6 = arrays.get("conv6")
    return 101 if RESNET101_ONLY_LAYER in arrays else 50, conv6[0].shape[-1] if conv6 else None


def decoded_names(path, group_name, names):
    """The `weight_names` attribute of a layer group as a list of str; WeightsError if it is not one."""
    if isinstance(names, (bytes, str)):
        names = [names]
    try:
        names = list(np.asarray(names).reshape(-1))
    except (TypeError, ValueError):
        names = None
    if names is None or not all(isinstance(n, (bytes, np.bytes_, str, np.str_)) for n in names):
        raise WeightsError(f"{path}: layer {group_name} has a weight_names attribute that is not a list of names")
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except UnicodeDecodeError:
        raise WeightsError(f"{path}: layer {group_name} has a weight name that is not UTF-8") from None


def read_layer_arrays(path, name, group):
    """The float32 arrays of one layer group, in the order of its `weight_names` attribute."""
    names = decoded_names(path, name, group.attrs.get("weight_names", []))
    arrays = []
    for weight_name in names:
        dataset = group.get(weight_name)
        if not isinstance(dataset, h5py.Dataset):
            raise WeightsError(f"{path}: layer {name} lists {weight_name} but the file has no such dataset")
        try:
            array = np.asarray(dataset, dtype=np.float32)
        except (TypeError, ValueError):
            raise WeightsError(f"{path}: layer {name}: {weight_name} does not hold numbers") from None
        if not np.all(np.isfinite(array)):
            raise WeightsError(f"{path}: layer {name}: {weight_name} holds NaN or infinite values")
        arrays.append(array)
    return arrays


def read_weights(path):
    """The arrays of every weighted layer of a Keras-2 HDF5 weights file, by layer name.

    Accepts `save_weights` files and full-model files (a `model_weights` group);
    arrays are listed in the order of the group's `weight_names` attribute. Raises
    WeightsError naming the file for anything that is not such a file, and naming
    the layer for a malformed group or a non-finite value.
    """
    problem = utils.file_problem(path, what="weights file")
    if problem:
        raise WeightsError(f"{path}: {problem}")
    try:
        with h5py.File(path, "r") as handle:
            root = handle["model_weights"] if isinstance(handle.get("model_weights"), h5py.Group) else handle
            weights = {}
            for name, group in root.items():
                if isinstance(group, h5py.Group):
                    arrays = read_layer_arrays(path, name, group)
                    if arrays:
                        weights[name] = arrays
            return weights
    except (OSError, KeyError, RuntimeError) as error:
        raise WeightsError(f"{path}: not a readable HDF5 weights file ({error})") from None


def write_failure(error):
    """An OSError saying why h5py failed to write ('File too large').

    h5py raises OSError with the errno of a failed write, with HDF5's whole error
    report as its text, and closing the file afterwards can raise a RuntimeError
    in its place; the errno is looked for along the chain of exceptions.
    """
    cause = error
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__context__
    if cause is None:
        return OSError(f"HDF5: {error}")
    return OSError(cause.errno, os.strerror(cause.errno))


def write_weights(path, layers, show_progress=False):
    """Writes [(layer name, [(weight name, array)])] as a Keras-2 `save_weights` HDF5 file, atomically.

    `show_progress` shows a progress bar over the layers on stderr when it is a terminal. A failed write
    raises utils.OutputError naming the file and the system's reason.
    """

    def write(temporary):
        try:
            with h5py.File(temporary, "w") as handle:
                handle.attrs["layer_names"] = np.array([name.encode("utf-8") for name, _ in layers])
                handle.attrs["backend"] = KERAS2_BACKEND
                handle.attrs["keras_version"] = KERAS2_VERSION
                for name, weights in tqdm(layers, desc="writing", unit="layer", leave=False,
                                         disable=None if show_progress else True):
                    group = handle.create_group(name)
                    weight_names = [f"{name}/{weight_name}:0" for weight_name, _ in weights]
                    group.attrs["weight_names"] = np.array([weight_name.encode("utf-8") for weight_name in weight_names])
                    for weight_name, (_, array) in zip(weight_names, weights):
                        group.create_dataset(weight_name, data=np.asarray(array, dtype=np.float32))
        except (OSError, RuntimeError) as error:
            raise write_failure(error) from None

    utils.write_atomic(path, write)
