"""The log of a training run: OUT/log.csv, a row per iteration, and the same as TensorBoard scalars."""

import contextlib
import csv
import io
import os
from pathlib import Path

from pspnet_keras import runtime

tf = runtime.import_tensorflow()

from tensorflow.core.framework import summary_pb2

import utils
from pspnet_keras.training.errors import TrainingError
from pspnet_keras.training.run_files import LOG_NAME
from pspnet_keras.training.run_files import TENSORBOARD_DIR

# TensorBoard's scalar summaries (tensorboard/plugins/scalar/summary_v2.py: plugin "scalars",
# empty content for version 0), written with TensorFlow's own tf.summary.write so that
# the tensorboard package is needed only to view them.
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
)
LOG_COLUMNS = ("iteration", "loss", "main_loss", "aux_loss", "lr", "images_per_s", "val_miou")


class RunLog:
    """OUT/log.csv and OUT/tensorboard/ of a run (the chief's; a no-op elsewhere).

    A resumed run drops the rows after its checkpoint (a killed run may have logged
    iterations it did not checkpoint) and appends from there; every row is flushed.
    TensorBoard gets each column as a scalar at the row's iteration. The rows kept are
    read on entering, and nothing is written before the first row: a run that stops
    before its first iteration leaves the log as it was. A file that cannot be read or
    written (a FIFO, a full disk, a read-only file system) is a TrainingError of one line.
    """

    def __init__(self, out, start, enabled=True):
        self.out = Path(out)
        self.start = start
        self.enabled = enabled
        self.kept_rows = []
        self.file = self.board = None

    def __enter__(self):
        if self.enabled:
            self.kept_rows = read_log_rows(self.out / LOG_NAME, self.start)
        return self

    def __exit__(self, error_type, error, traceback):
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
        return False

    def open(self):
        """Writes log.csv's header and the rows kept, and opens it and the TensorBoard writer."""
        path = self.out / LOG_NAME
        try:
            utils.write_atomic(path, lambda temporary: write_log_rows(temporary, self.kept_rows))
            self.file = open(path, "ab", buffering=0)
        except utils.OutputError as error:
            raise TrainingError(str(error)) from None
        except OSError as error:
            raise TrainingError(f"{path}: cannot write ({error.strerror or error})") from None
        board = self.out / TENSORBOARD_DIR
        try:
            self.board = tf.summary.create_file_writer(str(board))
        except tf.errors.OpError as error:
            raise TrainingError(f"{board}: cannot write ({first_line(error.message)})") from None

    def append(self, data):
        """Appends `data` to log.csv unbuffered, all of it or, where the disk refuses part of it, none:
        the file is cut back to where it ended, and TrainingError says why."""
        end = self.file.seek(0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += self.file.write(data[written:])
        except OSError as error:
            with contextlib.suppress(OSError):
                self.file.truncate(end)
            raise TrainingError(f"{self.out / LOG_NAME}: cannot write ({error.strerror or error})") from None

    def write(self, row):
        """Appends one iteration's row (LOG_COLUMNS; val_miou None when not measured)."""
        if not self.enabled:
            return
        if self.file is None:
            self.open()
        line = io.StringIO(newline="")
        csv.DictWriter(line, LOG_COLUMNS).writerow(
            {column: "" if row[column] is None else row[column] for column in LOG_COLUMNS}
        )
        self.append(line.getvalue().encode("utf-8"))
        try:
            with self.board.as_default(step=row["iteration"]):
                for column in LOG_COLUMNS[1:]:
                    if row[column] is not None:
                        tf.summary.write(column, tf.constant(row[column], tf.float32), metadata=SCALAR_METADATA)
        except tf.errors.OpError as error:
            raise TrainingError(f"{self.out / TENSORBOARD_DIR}: cannot write ({first_line(error.message)})") from None


def first_line(text):
    """The first line of a library's message."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "unknown error"


def read_log_rows(path, last_iteration):
    """The complete rows of a log.csv up to `last_iteration` ([] when there is none, or when
    `last_iteration` is 0); TrainingError when it is not a regular file that can be read."""
    if last_iteration == 0 or not os.path.lexists(path):
        return []
    problem = utils.file_problem(path)
    if problem:
        raise TrainingError(f"{path}: {problem}")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                try:
                    iteration = int(row["iteration"])
                except (TypeError, ValueError, KeyError):
                    continue
                if iteration <= last_iteration and None not in row.values():
                    rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TrainingError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    return rows


def write_log_rows(path, rows):
    """Writes log.csv's header and `rows` (dicts by LOG_COLUMNS) to `path`."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
