"""The training loop of train.py: steps, checkpoints, logs, validation, interruption, final model."""

import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from pspnet_keras import runtime

tf = runtime.import_tensorflow()

from tqdm import tqdm

import layers_builder
import utils
from pspnet_keras import cli
from pspnet_keras import metrics
from pspnet_keras import models
from pspnet_keras.inference import Predictor
from pspnet_keras.training.checkpoint import check_state
from pspnet_keras.training.checkpoint import restore_checkpoint
from pspnet_keras.training.checkpoint import variable_arrays
from pspnet_keras.training.checkpoint import write_checkpoint
from pspnet_keras.training.data import SampleReader
from pspnet_keras.training.data import distributed_dataset
from pspnet_keras.training.errors import NonFiniteWeights
from pspnet_keras.training.errors import TrainingError
from pspnet_keras.training.optimizer import PolyDecay
from pspnet_keras.training.recipe import AUX_WEIGHT
from pspnet_keras.training.recipe import BASE_LR
from pspnet_keras.training.recipe import HEAD_LR_MULTIPLIER
from pspnet_keras.training.recipe import MOMENTUM
from pspnet_keras.training.recipe import POLY_POWER
from pspnet_keras.training.recipe import WEIGHT_DECAY
from pspnet_keras.training.run_files import CHECKPOINT_NAME
from pspnet_keras.training.run_files import FINAL_WEIGHTS_NAME
from pspnet_keras.training.run_log import RunLog


class Interruptions:
    """SIGINT and SIGTERM recorded instead of raised while training, so a step and its
    bookkeeping finish before the run stops; a second signal stops at once."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def handle(self, signum, frame):
        if self.received is not None:
            raise cli.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def raise_received(self):
        """Raises what the recorded signal stands for: cli.Terminated for SIGTERM, KeyboardInterrupt for SIGINT."""
        raise cli.Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()


def validation_miou(predictor, samples, classes, quiet=True):
    """mIoU (metrics.py) of the predictor's default mode (one crop, flip) over `samples`."""
    confusion = np.zeros((classes, classes), np.int64)
    for sample in tqdm(samples, desc="validating", unit="img", disable=quiet, leave=False, dynamic_ncols=True):
        image, label = SampleReader([sample])(0)
        class_ids, _ = predictor.class_map(image)
        confusion += metrics.confusion_matrix(label, class_ids, classes)
    return metrics.summary(confusion)["miou"]


# The recipe's values that decide how far a step moves the weights: (flag, Settings field, the paper's value).
STEP_SIZE_VALUES = (
    ("--lr", "lr", BASE_LR),
    ("--head-lr-mult", "head_lr_mult", HEAD_LR_MULTIPLIER),
    ("--aux-weight", "aux_weight", AUX_WEIGHT),
    ("--momentum", "momentum", MOMENTUM),
    ("--weight-decay", "weight_decay", WEIGHT_DECAY),
    ("--power", "power", POLY_POWER),
)


def divergence_advice(settings):
    """What to try after the loss or the weights went non-finite: a lower --lr, and the recipe's other
    values that differ from the paper's (STEP_SIZE_VALUES), each with the paper's value."""
    advice = f"try a lower --lr than {settings.lr:g}"
    if settings.lr != BASE_LR:
        advice += f" (the recipe's is {BASE_LR:g})"
    departures = [
        f"{flag} {getattr(settings, field):g} (the recipe's is {value:g})"
        for flag, field, value in STEP_SIZE_VALUES[1:]
        if getattr(settings, field) != value
    ]
    if departures:
        advice += ", or values nearer the recipe's for " + ", ".join(departures)
    return advice


class Trainer:
    """The training loop of train.py around a training model, with its files in `out`.

    Each iteration: one step on the distributed batch, a row of log.csv and
    TensorBoard scalars (RunLog), validation mIoU every `val_every` iterations and
    at the end (on `val_samples`, in the inference protocol's default mode), a
    checkpoint every `checkpoint_every` iterations. Only the chief writes files.
    SIGINT or SIGTERM finishes the step, writes a checkpoint and raises
    KeyboardInterrupt (or cli.Terminated). A non-finite loss or weights raise
    TrainingError naming the iteration; nothing with non-finite weights is written.
    An output that cannot be written (a full disk, a read-only file system, the
    file-size limit) raises TrainingError naming the file, the system's reason and
    the last checkpoint, no temporary file left. `on_first_iteration()` is called
    once this process's first iteration is done, before anything of it is written.
    """

    def __init__(self, strategy, model, network, optimizer, settings, config, out, samples, val_samples=(),
                 fingerprint=None, chief=True, quiet=False, on_first_iteration=None):
        self.strategy = strategy
        self.model = model
        self.network = network
        self.optimizer = optimizer
        self.settings = settings
        self.config = config
        self.out = Path(out)
        self.samples = samples
        self.val_samples = list(val_samples)
        self.fingerprint = fingerprint
        self.chief = chief
        self.quiet = quiet or not chief
        self.on_first_iteration = on_first_iteration
        self.predictor = None
        self.checkpointed = None

    @property
    def iteration(self):
        """The number of steps taken, as the optimiser counts them."""
        return int(self.optimizer.iterations.numpy())

    def learning_rate(self, iteration):
        """The base learning rate of (0-based) step `iteration`."""
        return float(PolyDecay(self.settings.lr, self.settings.iterations, self.settings.power)(iteration))

    def resume(self):
        """Restores OUT/checkpoint.h5 when there is one; returns the iteration training goes on from.

        The checkpoint must be a regular file of this run: its state's fields fit the settings
        (checkpoint.check_state), its samples are this run's, its optimiser counts the iterations
        its state says. TrainingError naming the file otherwise.
        """
        path = self.out / CHECKPOINT_NAME
        if not os.path.lexists(path):
            return 0
        settings = self.settings
        state = restore_checkpoint(
            path, self.model, self.optimizer,
            check=lambda state: check_state(path, state, settings.iterations, settings.batch, settings.seed),
        )
        if state["fingerprint"] != self.fingerprint:
            raise TrainingError(
                f"{path}: the training samples are not those of the run being resumed (files added, removed "
                "or renamed, or other samples skipped); resume with the same data, or start a new run"
            )
        if self.iteration != state["iteration"]:
            raise TrainingError(
                f"{path}: the optimiser has taken {self.iteration} iterations but the state field 'iteration' "
                f"says {state['iteration']}; not a checkpoint train.py wrote"
            )
        self.checkpointed = state["iteration"]
        return state["iteration"]

    def kept(self):
        """What OUT holds to resume from, in words."""
        if self.checkpointed:
            return f"the last checkpoint is at iteration {self.checkpointed}"
        return "no checkpoint"

    def failure(self, what, iteration):
        """TrainingError: `what` went wrong at `iteration`, what is kept, and what to try."""
        return TrainingError(
            f"{what} at iteration {iteration}; nothing more was written ({self.kept()}); "
            f"{divergence_advice(self.settings)}"
        )

    def write_failure(self, error):
        """TrainingError: the output named in `error` (utils.OutputError, TrainingError) could not be
        written, and what OUT keeps."""
        return TrainingError(f"{error}; training stopped at iteration {self.iteration} ({self.kept()})")

    def checkpoint(self):
        """Writes OUT/checkpoint.h5 (chief only); TrainingError when the weights are not finite."""
        iteration = self.iteration
        if self.chief:
            state = {"iteration": iteration, "position": iteration * self.settings.batch,
                     "seed": self.settings.seed, "fingerprint": self.fingerprint}
            try:
                write_checkpoint(self.out / CHECKPOINT_NAME, self.model, self.optimizer, state)
            except NonFiniteWeights as error:
                raise self.failure(f"the weights are not finite ({error.path})", iteration) from None
            except utils.OutputError as error:
                raise self.write_failure(error) from None
        self.checkpointed = iteration

    def step_function(self):
        """The compiled step: the next distributed batch through model.train_step on every replica."""

        @tf.function
        def step(iterator):
            results = self.strategy.run(self.model.train_step, args=(next(iterator),))
            return {name: self.strategy.experimental_local_results(value)[0] for name, value in results.items()}

        return step

    def take_step(self, step, iterator):
        """One iteration: its losses, as floats; TrainingError when they are not finite or the data fails."""
        iteration = self.iteration + 1
        try:
            results = {name: float(value) for name, value in step(iterator).items()}
        except tf.errors.OpError as error:
            message = error.message.strip().splitlines()[0] if error.message else type(error).__name__
            raise TrainingError(f"training stopped at iteration {iteration}: {message} ({self.kept()})") from None
        if not math.isfinite(results["loss"]):
            raise self.failure(f"the loss is not finite ({results['loss']})", iteration)
        return results

    def validate(self):
        """The validation mIoU of the current weights (chief only; None elsewhere)."""
        if not self.chief or not self.val_samples:
            return None
        if self.predictor is None:
            logits, upsampling = layers_builder.split_upsampling(self.network)
            self.predictor = Predictor(
                logits, self.settings.crop_size, self.config.base_size, upsampling, mean_rgb=self.config.mean_rgb
            )
        return validation_miou(self.predictor, self.val_samples, self.config.classes, quiet=self.quiet)

    def write_final(self):
        """Writes OUT/final.h5 (the inference network, Keras-2 layout) and OUT/final.json, together: both
        or neither (TrainingError naming the file that could not be written)."""
        try:
            variable_arrays(self.network.weights)
        except NonFiniteWeights as error:
            raise self.failure(f"the weights are not finite ({error.path})", self.iteration) from None
        weights = self.out / FINAL_WEIGHTS_NAME

        def save_weights(temporary):
            try:
                layers_builder.save_weights(self.network, temporary)
            except utils.OutputError as error:
                raise utils.OutputError(f"{weights}: {str(error).removeprefix(f'{temporary}: ')}") from None

        try:
            with utils.AtomicFiles() as files:
                files.write(weights, save_weights)
                files.write(models.description_path(weights), utils.json_writer(self.config.description()))
                files.commit()
        except utils.OutputError as error:
            raise self.write_failure(error) from None
        return weights

    def run(self, start):
        """Trains from iteration `start` to settings.iterations; writes and returns OUT/final.h5 (chief; None
        elsewhere)."""
        settings = self.settings
        dataset = distributed_dataset(
            self.strategy, self.samples, self.config.mean_rgb, settings.crop_size, settings.batch, settings.seed, start
        )
        iterator = iter(dataset)
        step = self.step_function()
        self.checkpointed = start
        with RunLog(self.out, start, self.chief) as log, Interruptions() as interruptions, tqdm(
            total=settings.iterations, initial=start, desc="training", unit="it", disable=self.quiet,
            dynamic_ncols=True,
        ) as bar:
            clock = time.perf_counter()
            while self.iteration < settings.iterations and interruptions.received is None:
                results = self.take_step(step, iterator)
                iteration = self.iteration
                if iteration == start + 1 and self.on_first_iteration is not None:
                    self.on_first_iteration()
                now = time.perf_counter()
                row = {**results, "iteration": iteration, "lr": self.learning_rate(iteration - 1),
                       "images_per_s": settings.batch / (now - clock), "val_miou": None}
                last = iteration == settings.iterations
                if settings.val_every and (iteration % settings.val_every == 0 or last):
                    row["val_miou"] = self.validate()
                try:
                    log.write(row)
                except TrainingError as error:
                    raise self.write_failure(error) from None
                if iteration % settings.checkpoint_every == 0 or last:
                    self.checkpoint()
                bar.set_postfix(loss=f"{results['loss']:.4f}", refresh=False)
                bar.update()
                clock = time.perf_counter()
            if interruptions.received is not None:
                if self.iteration != self.checkpointed:
                    self.checkpoint()
                interruptions.raise_received()
        return self.write_final() if self.chief else None
