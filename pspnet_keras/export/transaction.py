"""`export`: a file written beside its target, checked in its runtime, and renamed into place, or nothing left."""

import os
import shutil
import tempfile
from pathlib import Path

import utils
from pspnet_keras import models
from pspnet_keras.export.formats import DEFAULT_OPSET
from pspnet_keras.export.runtimes import check_export
from pspnet_keras.export.writers import write_file


def move_into_place(source, target):
    """Renames `source` onto `target`; a SavedModel directory at `target` is swapped out and removed."""
    target = Path(target)
    if target.is_dir():
        old = Path(source).parent / f"{target.name}.old"
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


def export(network, config, file_format, path, opset=DEFAULT_OPSET, description=False):
    """Writes `network` in `file_format` at `path`, checked; returns (delta, argmax agreement).

    The file is written and checked (runtimes.check_export) in a temporary directory
    beside `path` and renamed into place only when it passes; otherwise nothing is
    left and ExportError says why (OSError when the disk refuses). With `description`,
    the model's JSON description is written beside it (models.description_path), in
    the same all-or-nothing way (utils.OutputError when it cannot be).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staged = staging / target.name
        write_file(network, config, file_format, staged, opset)
        result = check_export(network, config, file_format, staged)
        with utils.AtomicFiles() as files:
            if description:
                files.write(models.description_path(target), utils.json_writer(config.description()))
            move_into_place(staged, target)
            files.commit()
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
