"""The checkpoints of a training run: the model's and the optimiser's variables and the run's
state in one HDF5 file, written atomically and never with non-finite weights.

A checkpoint read back is checked before use: a regular file (utils.file_problem, so a FIFO
never blocks), HDF5 of this format, every variable of the right shape, numeric and finite,
the state's fields of the right types and ranges. Every problem is a TrainingError of one
line naming the file.
"""

import json

import h5py
import numpy as np

import utils
from pspnet_keras import cli
from pspnet_keras.keras2_weights import write_failure
from pspnet_keras.training.errors import NonFiniteWeights
from pspnet_keras.training.errors import TrainingError

CHECKPOINT_FORMAT = "pspnet-keras-checkpoint"
CHECKPOINT_VERSION = 1
# The longest part of a library's message a line shows.
SHOWN_CHARACTERS = 120


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
    the variables it trains. NonFiniteWeights, writing nothing, when a value is not finite;
    utils.OutputError naming the file and the system's reason (a full disk, a read-only
    file system, the file-size limit) when it cannot be written, no temporary file left.
    """
    model_paths = unique_paths(model.variables)
    model_arrays = variable_arrays(model.variables)
    optimizer_arrays = variable_arrays(optimizer.variables)
    trained = [variable.path for variable in model.trainable_variables]

    def write(temporary):
        try:
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
        except (OSError, RuntimeError) as error:
            raise write_failure(error) from None

    utils.write_atomic(path, write)


def json_attribute(handle, name, path):
    """The JSON text attribute `name` of a checkpoint, parsed; TrainingError when it is not one."""
    text = handle.attrs.get(name)
    if not isinstance(text, str):
        raise TrainingError(f"{path}: attribute '{name}' is not JSON text; not a checkpoint of train.py")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise TrainingError(f"{path}: attribute '{name}' is not valid JSON; not a checkpoint of train.py") from None


def stored_array(group, name, variable, path):
    """The array of `variable` stored as `name` in `group`, checked: present, its shape, numeric, finite."""
    stored = group.get(name) if isinstance(group, h5py.Group) else None
    shape = tuple(variable.shape)
    if not isinstance(stored, h5py.Dataset) or stored.shape != shape:
        raise TrainingError(f"{path}: no value of shape {shape} for {variable.path}")
    if stored.dtype.kind not in "biuf":
        raise TrainingError(f"{path}: the value of {variable.path} is not numeric ({stored.dtype})")
    array = np.asarray(stored)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise TrainingError(f"{path}: the value of {variable.path} is not finite")
    return array


def read_into(handle, path, model, optimizer, check):
    """Fills `model` and `optimizer` from an open checkpoint once check(state) accepted its state; returns
    the state."""
    checkpoint_format = handle.attrs.get("format")
    if not isinstance(checkpoint_format, str) or checkpoint_format != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a checkpoint of train.py")
    state = json_attribute(handle, "state", path)
    if not isinstance(state, dict):
        raise TrainingError(f"{path}: attribute 'state' is not a JSON object; not a checkpoint of train.py")
    check(state)
    if json_attribute(handle, "trained", path) != [variable.path for variable in model.trainable_variables]:
        raise TrainingError(f"{path}: trains other variables than this run (another model or --train-bn)")
    slots = handle.get("optimizer")
    if not isinstance(slots, h5py.Group) or len(slots) != len(optimizer.variables):
        raise TrainingError(f"{path}: optimiser state of another optimiser")
    arrays = [
        stored_array(handle.get("model"), variable_path, variable, path)
        for variable, variable_path in zip(model.variables, unique_paths(model.variables))
    ]
    arrays += [stored_array(slots, str(index), variable, path) for index, variable in enumerate(optimizer.variables)]
    for variable, array in zip(model.variables + optimizer.variables, arrays):
        variable.assign(array)
    return state


def restore_checkpoint(path, model, optimizer, check=lambda state: None):
    """Loads a checkpoint written by write_checkpoint into `model` and its built `optimizer`; returns its
    state, a dict. check(state) runs first and raises what does not fit (see check_state); nothing is
    assigned unless the state and every array are sound."""
    problem = utils.file_problem(path, what="checkpoint")
    if problem:
        raise TrainingError(f"{path}: {problem}")
    try:
        with h5py.File(path, "r") as handle:
            return read_into(handle, path, model, optimizer, check)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:SHOWN_CHARACTERS]
        raise TrainingError(f"{path}: unreadable checkpoint ({reason})") from None


def state_field_problem(state, iterations, batch, seed):
    """(field, problem) of the first field of a checkpoint's state that does not fit the run, or None.

    The run's `iterations`, `batch` and `seed` bound them: iteration an integer 0..iterations,
    position iteration x batch (the samples taken), seed the run's, fingerprint a string.
    """
    iteration = state.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool) or not 0 <= iteration <= iterations:
        return "iteration", f"must be an integer 0..{iterations} (the run's iterations), not {cli.shown_value(iteration)}"
    position = state.get("position")
    if position != iteration * batch or isinstance(position, bool):
        return "position", f"must be {iteration * batch} (iteration {iteration} x batch {batch}), not {cli.shown_value(position)}"
    if state.get("seed") != seed or isinstance(state.get("seed"), bool):
        return "seed", f"must be the run's seed {seed}, not {cli.shown_value(state.get('seed'))}"
    if not isinstance(state.get("fingerprint"), str):
        return "fingerprint", f"must be a string, not {cli.shown_value(state.get('fingerprint'))}"
    return None


def check_state(path, state, iterations, batch, seed):
    """Refuses a checkpoint state that does not fit the run (state_field_problem): TrainingError naming
    the file and the field."""
    found = state_field_problem(state, iterations, batch, seed)
    if found:
        field, problem = found
        raise TrainingError(f"{path}: state field '{field}' {problem}")
