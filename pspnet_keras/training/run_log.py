"""The log of a training run: OUT/log.csv, a row per iteration, and the same as TensorBoard scalars."""

import csv
from pathlib import Path

from pspnet_keras import runtime

tf = runtime.import_tensorflow()

from tensorflow.core.framework import summary_pb2

import utils
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
    TensorBoard gets each column as a scalar at the row's iteration.
    """

    def __init__(self, out, start, enabled=True):
        self.out = Path(out)
        self.start = start
        self.enabled = enabled
        self.file = self.writer = self.board = None

    def __enter__(self):
        if self.enabled:
            path = self.out / LOG_NAME
            rows = read_log_rows(path, self.start)
            utils.write_atomic(path, lambda temporary: write_log_rows(temporary, rows))
            self.file = open(path, "a", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.file, LOG_COLUMNS)
            self.board = tf.summary.create_file_writer(str(self.out / TENSORBOARD_DIR))
        return self

    def __exit__(self, *exc_info):
        if self.enabled:
            self.file.close()
            self.board.close()
        return False

    def write(self, row):
        """Appends one iteration's row (LOG_COLUMNS; val_miou None when not measured)."""
        if not self.enabled:
            return
        self.writer.writerow({column: "" if row[column] is None else row[column] for column in LOG_COLUMNS})
        self.file.flush()
        with self.board.as_default(step=row["iteration"]):
            for column in LOG_COLUMNS[1:]:
                if row[column] is not None:
                    tf.summary.write(column, tf.constant(row[column], tf.float32), metadata=SCALAR_METADATA)


def read_log_rows(path, last_iteration):
    """The complete rows of a log.csv up to `last_iteration`."""
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
    except FileNotFoundError:
        pass
    return rows


def write_log_rows(path, rows):
    """Writes log.csv's header and `rows` (dicts by LOG_COLUMNS) to `path`."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
