"""The checkpoints of a training run: the model's and the optimiser's variables and the run's
state in one HDF5 file, written atomically and never with non-finite weights.
"""

import json

import h5py
import numpy as np

import utils
from pspnet_keras.training.errors import NonFiniteWeights
from pspnet_keras.training.errors import TrainingError

CHECKPOINT_FORMAT = "pspnet-keras-checkpoint"
CHECKPOINT_VERSION = 1


def unique_paths(variables):
    """The paths of `variables`, which must tell them apart."""
    paths = [variable.path for variable in variables]
    if len(set(paths)) != len(paths):
        raise ValueError("variables with the same path cannot be checkpointed by path")
    return paths


def variable_arrays(variables):
    """The values of `variables` as NumPy arrays; NonFiniteWeights when one is not finite."""
    arrays = [np.asarray(variable.numpy()) for variable in variables]
    for variable, array in zip(variables, arrays):
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise NonFiniteWeights(variable.path)
    return arrays


def write_checkpoint(path, model, optimizer, state):
    """Writes model and optimiser variables and `state` (a JSON-able dict) to `path`, atomically.

    Model variables are stored by path, the optimiser's in order with the paths of
    the variables it trains. NonFiniteWeights, writing nothing, when a value is not finite.
    """
    model_paths = unique_paths(model.variables)
    model_arrays = variable_arrays(model.variables)
    optimizer_arrays = variable_arrays(optimizer.variables)
    trained = [variable.path for variable in model.trainable_variables]

    def write(temporary):
        with h5py.File(temporary, "w") as handle:
            handle.attrs["format"] = CHECKPOINT_FORMAT
            handle.attrs["version"] = CHECKPOINT_VERSION
            handle.attrs["state"] = json.dumps(state)
            handle.attrs["trained"] = json.dumps(trained)
            weights = handle.create_group("model")
            for variable_path, array in zip(model_paths, model_arrays):
                weights.create_dataset(variable_path, data=array)
            slots = handle.create_group("optimizer")
            for index, array in enumerate(optimizer_arrays):
                slots.create_dataset(str(index), data=array)

    utils.write_atomic(path, write)


def restore_checkpoint(path, model, optimizer):
    """Loads a checkpoint written by write_checkpoint into `model` and its built `optimizer`; returns its state."""
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("format") != CHECKPOINT_FORMAT:
                raise TrainingError(f"{path}: not a checkpoint of train.py")
            state = json.loads(handle.attrs["state"])
            trained = json.loads(handle.attrs["trained"])
            if trained != [variable.path for variable in model.trainable_variables]:
                raise TrainingError(f"{path}: trains other variables than this run (another model or --train-bn)")
            for variable, variable_path in zip(model.variables, unique_paths(model.variables)):
                stored = handle["model"].get(variable_path)
                if stored is None or stored.shape != tuple(variable.shape):
                    raise TrainingError(f"{path}: no value of shape {tuple(variable.shape)} for {variable_path}")
                variable.assign(np.asarray(stored))
            slots = handle["optimizer"]
            if len(slots) != len(optimizer.variables):
                raise TrainingError(f"{path}: optimiser state of another optimiser")
            for index, variable in enumerate(optimizer.variables):
                variable.assign(np.asarray(slots[str(index)]))
    except (OSError, KeyError, ValueError) as error:
        raise TrainingError(f"{path}: unreadable checkpoint ({error})") from None
    return state
