"""What an exported file is: its formats, the names of its inputs and outputs, and ExportError."""

FORMATS = ("keras", "saved_model", "onnx", "litert")
# Python modules each format needs beyond requirements.txt (requirements-export.txt pins them).
DEPENDENCIES = {"onnx": ("tf2onnx", "onnx", "onnxruntime"), "litert": ("ai_edge_litert",)}
# The ONNX opsets offered (tf2onnx 1.17 would pick 15 by itself); ONNX Runtime 1.32 runs both.
ONNX_OPSETS = (17, 18)
DEFAULT_OPSET = 17

# Names of the exported inputs and outputs. "data" is the input blob of the Caffe deploy nets.
INPUT_NAME = "data"
LOGITS = "logits"
SEGMENT = "segment"
IMAGE_NAME = "image"
CLASS_IDS = "class_ids"
MAX_PROBABILITY = "max_probability"
# The file that makes a directory a SavedModel.
SAVED_MODEL_FILE = "saved_model.pb"
# What a SavedModel folder is made of, the names a folder replaced by an export may hold: what
# tf.saved_model.save writes (tensorflow/python/saved_model/constants.py: saved_model.pb or .pbtxt,
# variables/, assets/, debug/ with save_debug_info; fingerprint.pb), and tf.keras' keras_metadata.pb.
SAVED_MODEL_ENTRIES = (
    SAVED_MODEL_FILE, "saved_model.pbtxt", "variables", "assets", "debug", "fingerprint.pb", "keras_metadata.pb"
)
# What its subfolders hold, as regular expressions of the names: the variables' checkpoint (an index and
# its data shards) and the debug information. assets/ holds the files the model's graph reads, any names.
SAVED_MODEL_SUBFOLDER_NAMES = {
    "variables": r"variables\.(index|data-\d{5}-of-\d{5})",
    "debug": r"saved_model_debug_info\.pb",
}


class ExportError(ValueError):
    """An export that failed, or whose file does not compute the Keras network's logits; the message says why."""


# Grey levels of an 8-bit pixel: 0..PIXEL_RANGE (the `segment` signature's image, the check's crops).
PIXEL_RANGE = 255.0
