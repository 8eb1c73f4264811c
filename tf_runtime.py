"""How the project starts TensorFlow: quietly, on the chosen GPU, at the chosen precision.

TensorFlow's C++ runtime logs start-up lines on stderr (CUDA probing, oneDNN and
CPU-feature notices). `import_tensorflow` hides them unless the user asked for
them (`-v`, or a TF_CPP_MIN_LOG_LEVEL of their own). TF_CPP_MIN_LOG_LEVEL only
reaches the lines logged after absl's logging starts; the few logged before it
(absl's "All log messages before absl::InitializeLog()" notice and the lines of
cudart_stub.cc and port.cc) are taken out of what the import writes on file
descriptor 2, and everything else it writes, a real import error included, is
passed on.

This module imports nothing heavy, so that command lines parse before
TensorFlow loads.
"""

import os
import re
import sys
import tempfile

# Keras dtype policy of each precision: weights stay float32, mixed ones compute in 16 bits.
PRECISION_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PRECISIONS = tuple(PRECISION_POLICIES)

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# Only FATAL messages: the CPU-only cuInit failure is logged as an ERROR.
QUIET_LOG_LEVEL = "3"
# A line of absl/glog logging ("I0000 00:00:1795788211.191277    2837 cudart_stub.cc:31] ..."),
# absl's notice before its logging starts, and the continuation of the CPU-feature notice.
START_UP_LINE = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.\-]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions:"
    r"|To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`)"
)


def wants_start_up_logs(verbose):
    """Whether TensorFlow's C++ start-up lines are kept: with -v, or when the user set the log level."""
    return verbose or LOG_LEVEL_VARIABLE in os.environ


def passed_on(text):
    """What a quiet import lets through of the text it caught on stderr: all but start-up lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not START_UP_LINE.match(line))


def import_tensorflow(verbose=False):
    """The tensorflow module, imported without TensorFlow's C++ start-up lines unless wanted."""
    if "tensorflow" in sys.modules or wants_start_up_logs(verbose):
        import tensorflow

        return tensorflow
    os.environ[LOG_LEVEL_VARIABLE] = QUIET_LOG_LEVEL
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            sys.stderr.write(passed_on(caught.read().decode("utf-8", "replace")))
            sys.stderr.flush()
    return tensorflow
