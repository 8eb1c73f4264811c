"""Where training starts (train.py --init): the model of a released name or a weights file, and
its weights loaded into the network to train, conv6 fresh when the classes differ.

init_model imports neither TensorFlow nor Keras, so that train.py checks --init before
TensorFlow starts; load_init_weights imports them.
"""

import os
from pathlib import Path

import utils
from pspnet_keras import keras2_weights
from pspnet_keras import models
from pspnet_keras.training.errors import TrainingError


def released_config_of_weights(path, arrays):
    """The released model whose layout the weights in `arrays` (read from `path`) have."""
    depth = 101 if "conv4_23_1x1_reduce" in arrays else 50
    conv6 = arrays.get("conv6")
    classes = conv6[0].shape[-1] if conv6 else None
    for config in models.RELEASED_MODELS.values():
        if (config.depth, config.classes) == (depth, classes):
            return config
    raise TrainingError(
        f"{path}: the weights of a ResNet-{depth} PSPNet of {classes} classes, which is no released model, "
        f"and no description {models.description_path(path).name} beside them"
    )


def init_model(init):
    """(ModelConfig, weights path) of --init: a released model's name (path None: its weights as
    pspnet.py finds them), or a weights file (.h5) with its description beside it (a user model such
    as a run's final.h5) or without one (a released model's weights, recognised by their layers)."""
    if init in models.RELEASED_MODELS:
        return models.RELEASED_MODELS[init], None
    path = Path(init)
    problem = utils.file_problem(path, what="weights file")
    if problem:
        raise TrainingError(f"{path}: {problem}")
    description = models.description_path(path)
    problem = utils.file_problem(description, what="model description") if os.path.lexists(description) else None
    if problem:
        raise TrainingError(f"{description}: {problem} (the description beside the --init weights)")
    try:
        config = models.model_of_weights(path)
        if config is None:
            config = released_config_of_weights(path, keras2_weights.read_weights(path))
    except (models.ModelDescriptionError, keras2_weights.WeightsError) as error:
        raise TrainingError(str(error)) from None
    return config, path


def load_init_weights(network, path, init_config):
    """Fills the inference network to train from `path`, the weights of `init_config` (init_model's);
    returns the names of the layers that keep their fresh initialisation.

    Every weighted layer comes from the file, read and checked layer by layer and shape by shape by
    layers_builder.load_weights, except conv6 when `init_config` has another number of classes: it
    keeps Keras' initialisation, as a new layer in hszhao/semseg starts from torch's. (The auxiliary
    classifier is not in the inference network: it always starts fresh.) TrainingError names the file
    and the layer of a weights file that does not fit.
    """
    import layers_builder

    fresh = [] if init_config.classes == network.get_layer("conv6").filters else ["conv6"]
    try:
        layers_builder.load_weights(network, path, fresh=fresh)
    except keras2_weights.WeightsError as error:
        raise TrainingError(str(error)) from None
    return fresh
