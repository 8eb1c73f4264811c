"""`PSPNet`: a network with its weights, predicting the class probabilities of whole images.

The network is a released model (models.RELEASED_MODELS) or a user's (a weights
file with its JSON description beside it, models.py); its weights are loaded by
layer name (layers_builder), downloaded first for a released model whose file is
missing (download.py); images are predicted with the Caffe release's evaluation
protocol (inference.Predictor). pspnet.py re-exports `PSPNet` for users.
"""

import os
import warnings
from pathlib import Path

import numpy as np

from pspnet_keras import cli
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.download import WeightsNotFound
from pspnet_keras.download import default_weights_path
from pspnet_keras.download import download_weights


class PSPNet:
    """A PSPNet with its weights, predicting class probabilities of images.

    `model` is a released model's name (models.RELEASED_MODEL_NAMES, default
    pspnet50_ade20k) or a models.ModelConfig; left out, a `weights` file with a
    JSON description beside it is that user model. `weights` is the path of a
    Keras-2 HDF5 weights file (or a Keras archive written by export.py --format
    keras); for a released model by default
    `weights/keras/<model>.h5` in the project's folder (beside pspnet.py,
    download.WEIGHTS_DIR), downloaded from the published URL when missing (`show_progress` shows that download's progress
    bar on stderr). `precision` is float32, or bfloat16 / float16 mixed
    precision on a GPU, or bfloat16 on a CPU with AVX512_BF16 or AMX on
    TensorFlow (runtime.precision_problem). Raises WeightsNotFound when the weights cannot be found
    or downloaded, layers_builder.WeightsError when they do not fit the network,
    and ValueError (models.ModelDescriptionError among them) for an unknown
    model, a wrong description or a precision that cannot run here.

    It runs on the Keras backend of the process (TensorFlow, JAX or PyTorch), which Keras
    takes from KERAS_BACKEND or ~/.keras/keras.json when it is first imported.
    """

    def __init__(self, model=None, weights=None, show_progress=True, precision="float32"):
        runtime.prepare_precision(precision)
        from layers_builder import build_loaded_pspnet
        from layers_builder import build_pspnet
        from layers_builder import load_keras_archive
        from layers_builder import split_upsampling
        from pspnet_keras import backend
        from pspnet_keras.inference import Predictor

        if isinstance(model, models.ModelConfig):
            config = model
        else:
            config = models.resolve_model(model, weights)
        problem = runtime.precision_problem(precision, backend.gpu_names())
        if problem:
            raise ValueError(problem)
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
        elif weights is not None or self.weights_path.exists():
            described = models.description_path(self.weights_path)
            if config.released or not os.path.lexists(described):
                described = None
            self.model = build_loaded_pspnet(config, self.weights_path, precision=precision, description=described)
        else:
            self.model = build_pspnet(config, precision=precision, initialized=False)
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

    def segment_video(self, path, sliding=False, flip=True, multi_scale=False, every=1, start=0.0, duration=None,
                      batch_size=None):
        """(timestamp in seconds, class ids uint8 (H, W), their probabilities float32 (H, W)) for each frame
        of a video, in order, as `class_map` gives them for the frame.

        One frame in `every` is segmented and the frames between repeat its result;
        `start` and `duration` (seconds) choose a part of the video, whose timestamps
        then count from `start`. `batch_size` frames go through the network at a time
        (default: video.device_batch_size()). Decoding runs ahead in a thread of its
        own, and memory does not grow with the length of the video. A frame that cannot
        be decoded is skipped with a warning (warnings.warn). Raises video.VideoError for a
        file that cannot be read as a video, for a part of it holding no frame, and, after
        the frames that could be read, for a video cut short.
        """
        from pspnet_keras import video

        batch_size = batch_size or video.device_batch_size()
        protocol = {"sliding": sliding, "flip": flip, "multi_scale": multi_scale}
        with video.FrameReader(path, start, duration, video.QUEUED_BATCHES * batch_size, warn=warnings.warn) as reader:
            for frame, class_ids, confidence in video.segmented_frames(self, reader, protocol, every, batch_size):
                yield frame.time, class_ids, confidence
        if reader.end.cut_short or reader.end.frames == 0:
            raise video.VideoError(f"{path}: {reader.end.cut_short or video.NO_FRAMES}")

    def forward_count(self, height, width, sliding=False, flip=True, multi_scale=False):
        """The number of forward passes `predict` makes for an image of (height, width)."""
        return self.predictor.forward_count(height, width, sliding=sliding, flip=flip, multi_scale=multi_scale)


def PSPNet50(weights=None, show_progress=True):
    """PSPNet-50 trained on ADE20K (150 classes), as the 2017 port's PSPNet50."""
    return PSPNet("pspnet50_ade20k", weights=weights, show_progress=show_progress)


def PSPNet101(dataset="voc2012", weights=None, show_progress=True):
    """PSPNet-101 trained on `dataset` ('voc2012' or 'cityscapes'), as the 2017 port's PSPNet101."""
    return PSPNet(f"pspnet101_{dataset}", weights=weights, show_progress=show_progress)


def load_network(config, weights=None, show_progress=True, precision="float32"):
    """`PSPNet(config, weights, show_progress, precision)` for a command line: cli.CommandError with one
    line when its weights cannot be found, downloaded or loaded, or the precision cannot run here."""
    from layers_builder import WeightsError

    try:
        return PSPNet(config, weights=weights, show_progress=show_progress, precision=precision)
    except (OSError, WeightsError, ValueError) as error:
        raise cli.CommandError(str(error)) from None
