"""One writer per format: each writes the network of a model as that format at a path.

A writer is called as writer(network, config, path, opset): `network` the Keras
network at the model's crop size, `config` its models.ModelConfig, `opset` the ONNX
opset (used by write_onnx only).
"""

import errno
import logging
import os
import tempfile
from pathlib import Path

from pspnet_keras import runtime
from pspnet_keras.export import graph
from pspnet_keras.export.formats import IMAGE_NAME
from pspnet_keras.export.formats import INPUT_NAME
from pspnet_keras.export.formats import LOGITS
from pspnet_keras.export.formats import SEGMENT
from pspnet_keras.export.formats import ExportError

tf = runtime.import_tensorflow()

import keras

from layers_builder import first_line

# tf2onnx's einsum optimizer tries every ordering of the letters of each Einsum
# (5040 for conv5_4's) to decompose it; ONNX Runtime runs the Einsum itself as fast
# (bench/README.md, "Deploy"), so it is left out of tf2onnx's optimizer list.
ONNX_SKIPPED_OPTIMIZERS = ("einsum_optimizer",)
# tf2onnx/convert.py: with this variable set, tf2onnx's optimizers change the graph in
# place instead of each working on a deep copy of it, weights included.
ONNX_CATCH_ERRORS_VARIABLE = "TF2ONNX_CATCH_ERRORS"
# The errnos of a disk that refuses a write: full, over quota, over the file-size limit (RLIMIT_FSIZE),
# read-only, not permitted, failing.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def crop_spec(network, batch):
    """The tf.TensorSpec of the network's input: float32 (batch, S, S, 3) named "data"; batch None is any."""
    return tf.TensorSpec((batch, *network.input_shape[1:]), tf.float32, name=INPUT_NAME)


def logits_function(network):
    """The network's (N, S, S, 3) -> {"logits": float32 (N, S, S, classes)} function, in inference mode."""
    return lambda data: {LOGITS: tf.cast(network(data, training=False), tf.float32)}


def write_keras(network, config, path, opset):
    """Writes a Keras archive (keras.saving.save_model): the network's layers, their configs and weights."""
    network.save(path)


def saved_model_archive(network, config, batch=None, segment=True):
    """A keras.export.ExportArchive of the network with its `logits` (and `segment`) signatures.

    `segment` comes first, so that it is also TF Serving's `serving_default`.
    """
    archive = keras.export.ExportArchive()
    archive.track(network)
    if segment:
        archive.add_endpoint(
            SEGMENT, graph.segment_function(network, config.mean_rgb),
            input_signature=[tf.TensorSpec((None, None, 3), tf.uint8, name=IMAGE_NAME)],
        )
    archive.add_endpoint(LOGITS, logits_function(network), input_signature=[crop_spec(network, batch)])
    return archive


def write_saved_model(network, config, path, opset):
    """Writes a SavedModel directory for TF Serving with the signatures `segment` (default) and `logits`."""
    saved_model_archive(network, config).write_out(path, verbose=False)


def write_onnx(network, config, path, opset, skipped_optimizers=ONNX_SKIPPED_OPTIMIZERS):
    """Writes an ONNX model of the logits at `opset`, input "data" (any batch), output "logits" (tf2onnx).

    tf2onnx's graph optimizers run but for `skipped_optimizers`.
    """
    os.environ.setdefault(ONNX_CATCH_ERRORS_VARIABLE, "FALSE")
    import onnx
    import tf2onnx
    from tf2onnx import optimizer

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    # tf2onnx's default list of optimizers, in its order (tf2onnx/optimizer/__init__.py).
    optimizers = {
        name: factory for name, factory in optimizer._get_optimizers().items() if name not in skipped_optimizers
    }
    model_proto, _ = tf2onnx.convert.from_keras(
        network, input_signature=[crop_spec(network, None)], opset=opset, optimizers=optimizers
    )
    rename_output(model_proto.graph, LOGITS)
    onnx.save(model_proto, path)


def rename_output(graph_proto, name):
    """Gives the one output of an ONNX graph the name `name`, where it is made and where it is read."""
    old = graph_proto.output[0].name
    for node in graph_proto.node:
        node.output[:] = [name if output == old else output for output in node.output]
        node.input[:] = [name if value == old else value for value in node.input]
    graph_proto.output[0].name = name


def write_litert(network, config, path, opset):
    """Writes a LiteRT (.tflite) model of the logits for one crop, signature "logits", TFLite built-in ops only.

    Converted from a SavedModel of the `logits` signature with a batch of one, the
    path Keras' own LiteRT export takes; the batch is static because LiteRT
    cannot size the einsums of conv5_4 for a dynamic one.
    """
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as directory:
        saved_model_archive(network, config, batch=1, segment=False).write_out(directory, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=[LOGITS])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        content = converter.convert()
    Path(path).write_bytes(content)


WRITERS = {"keras": write_keras, "saved_model": write_saved_model, "onnx": write_onnx, "litert": write_litert}


def disk_error(error):
    """The OSError that `error`, or an error it was raised from, stands for when the disk refused a write; None
    otherwise. TensorFlow's file systems end such a message with the C library's text of the errno
    (xla/tsl/platform/errors.cc, IOError: "<context>; <strerror>"), followed by the operation's name."""
    while error is not None:
        message = str(error)
        for code in DISK_ERRNOS:
            if f"; {os.strerror(code)}" in message:
                return OSError(code, os.strerror(code))
        error = error.__cause__ or error.__context__
    return None


def write_file(network, config, file_format, path, opset):
    """Writes the file of `file_format` at `path`; a converter's failure becomes ExportError, the disk's OSError."""
    try:
        WRITERS[file_format](network, config, os.fspath(path), opset)
    except OSError:
        raise
    except Exception as error:  # TensorFlow's, tf2onnx's and the LiteRT converter's errors have no common type
        disk = disk_error(error)
        if disk is not None:
            raise disk from None
        raise ExportError(f"cannot write it as {file_format} ({first_line(error)})") from None
