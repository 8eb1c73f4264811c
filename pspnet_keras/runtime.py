"""How the project starts Keras on its backend, and TensorFlow quietly, with thread pools sized to the machine.

The backend is chosen the Keras way (keras.io, "Configuring your backend"): the
KERAS_BACKEND variable, else the "backend" field of keras.json in KERAS_HOME
(~/.keras by default), else TensorFlow. The inference commands' --backend sets
KERAS_BACKEND before Keras is imported (`configure`). TensorFlow, JAX and PyTorch
are supported (BACKENDS); `import_keras` imports Keras on the chosen one, and
TensorFlow first, quietly, when it is TensorFlow.

TensorFlow's C++ runtime logs start-up lines on stderr (CUDA probing, oneDNN and
CPU-feature notices). `import_tensorflow` hides them unless the user asked for
them (`-v`, or a TF_CPP_MIN_LOG_LEVEL of their own). TF_CPP_MIN_LOG_LEVEL only
reaches the lines logged after absl's logging starts; the few logged before it
(absl's "All log messages before absl::InitializeLog()" notice and the lines of
cudart_stub.cc and port.cc) are taken out of what the import writes on file
descriptor 2 (`native_stderr`), and everything else it writes, a real import
error included, is passed on.

Thread pools and oneDNN: one inter-op thread, one intra-op thread per core this
process may run on (os.sched_getaffinity, not the host's count), and TensorFlow's
oneDNN graph rewrites off. A user's own TF_NUM_INTEROP_THREADS,
TF_NUM_INTRAOP_THREADS and TF_ENABLE_ONEDNN_OPTS win. Measured with
bench/cpu_threads.py (bench/README.md, "Thread pools and oneDNN"): on a 2-core
AVX-512 VM one inter-op thread took a pspnet50_ade20k forward pass from 1.92-2.01 s
to 1.69-1.80 s and oneDNN off to 1.61-1.64 s; on a 2-core AVX2 VM every setting
stayed within the noise of the others (2.5-2.8 s), so the rule costs nothing there.

Precision: float32 everywhere; mixed bfloat16 and float16 on a GPU. Without a GPU, float16
is refused (the backends emulate it on the CPU, slower than float32), and so is bfloat16
except for inference on TensorFlow on a CPU that computes it in hardware (pspnet_keras/cpu.py:
AVX512_BF16 or AMX). There TensorFlow's bfloat16 kernels are oneDNN's, so a bfloat16 run starts
TensorFlow with oneDNN on (`prepare_precision`; a user's own TF_ENABLE_ONEDNN_OPTS wins). Measured
by the request's filer on a 2-core AMD EPYC with AVX512_BF16 (synthetic weights; README.md): the
network in mixed bfloat16 took 0.94-2.0 s against 2.0-4.7 s in float32 in the same runs, with class
ids as float32's at 98 % of the pixels and probabilities within 1.1e-2. JAX and PyTorch were not
measured there, and refuse it. bench/bfloat16.py measures TensorFlow's bfloat16 on such a CPU.

Each command parses its line, calls `configure` once (verbosity, --id), and
imports TensorFlow only when it needs it; the library's modules that need
TensorFlow import it through `import_tensorflow`, so that it starts the same way
whichever of them comes first. This module imports nothing heavy, so that
command lines parse before TensorFlow loads.
"""

import contextlib
import importlib.util
import json
import os
import re
import sys
import tempfile

from pspnet_keras import cpu

# Keras dtype policy of each precision: weights stay float32, mixed ones compute in 16 bits.
PRECISION_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PRECISIONS = tuple(PRECISION_POLICIES)

INTER_OP_VARIABLE = "TF_NUM_INTEROP_THREADS"
INTRA_OP_VARIABLE = "TF_NUM_INTRAOP_THREADS"
INTER_OP_THREADS = 1
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
ONEDNN_OPTS = "0"
# oneDNN for a bfloat16 network: TensorFlow's fast bfloat16 CPU kernels are oneDNN's.
BFLOAT16_ONEDNN_OPTS = "1"
# How TensorFlow reads TF_ENABLE_ONEDNN_OPTS (tensorflow/core/util/env_var.cc, ReadBoolFromEnvVar): these
# values, in any case, turn oneDNN off; unset or any other value leaves its default, on for every CPU with
# AVX512_BF16 or AMX (tensorflow/core/util/util.cc, IsMKLEnabled). It is read once, when TensorFlow starts.
ONEDNN_OFF_VALUES = ("0", "false")
# The one backend bfloat16 runs on without a GPU: the only one measured faster in bfloat16 than in float32
# on a CPU (the module's docstring).
CPU_BFLOAT16_BACKEND = "tensorflow"
# Why each mixed precision needs a GPU, as a refusal says it: float16 in inference, and any in training.
NO_CPU_REASONS = {
    "float16": "the backends emulate float16 on the CPU, slower than float32",
    "bfloat16": "training runs bfloat16 on a GPU only",
}
LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# Keras 3 reads its backend from this variable when it is imported (keras.io, "Configuring your backend"),
# else from the "backend" field of keras.json in KERAS_HOME, by default ~/.keras (/tmp/.keras where the
# home folder cannot be written, as keras/src/backend/config.py does).
KERAS_BACKEND_VARIABLE = "KERAS_BACKEND"
KERAS_HOME_VARIABLE = "KERAS_HOME"
KERAS_CONFIG_NAME = "keras.json"
DEFAULT_BACKEND = "tensorflow"
BACKENDS = ("tensorflow", "jax", "torch")
# The module each backend imports, its name for users, and the requirements file that installs it.
BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
BACKEND_TITLES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
BACKEND_REQUIREMENTS = {"tensorflow": "requirements.txt", "jax": "requirements-jax.txt", "torch": "requirements-torch.txt"}
# TensorFlow's default CPU allocator maps fresh pages for every large tensor and pays a page
# fault per 4 KiB at each use; its BFC allocator keeps them (bench/README.md).
CPU_ALLOCATOR_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"
CPU_ALLOCATOR = "true"
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


# What configure() was told: whether TensorFlow's start-up lines are wanted (-v), whether --backend chose
# the backend; once TensorFlow is imported by import_tensorflow, the TF_ENABLE_ONEDNN_OPTS it started with
# ("onednn_at_start", None where it was unset).
_settings = {"verbose": False, "backend_option": False}


def configure(verbose=False, gpu_id=None, backend=None, precision="float32"):
    """Sets how Keras and its backend will start in this process, before they are imported: the
    backend `backend` (--backend, through KERAS_BACKEND; None keeps the Keras way of choosing),
    TensorFlow's start-up lines kept when `verbose`, only the GPU `gpu_id` visible (--id, through
    CUDA_VISIBLE_DEVICES, which all three backends read), and the thread pools, oneDNN and
    allocator settings of the module's docstring unless the user set them; oneDNN on for a network
    computing in `precision` bfloat16 (`prepare_precision`)."""
    _settings["verbose"] = verbose
    if backend is not None:
        os.environ[KERAS_BACKEND_VARIABLE] = backend
        _settings["backend_option"] = True
    if gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    inter_op, intra_op = thread_pool_sizes()
    os.environ.setdefault(INTER_OP_VARIABLE, str(inter_op))
    os.environ.setdefault(INTRA_OP_VARIABLE, str(intra_op))
    prepare_precision(precision)
    os.environ.setdefault(ONEDNN_VARIABLE, ONEDNN_OPTS)
    os.environ.setdefault(CPU_ALLOCATOR_VARIABLE, CPU_ALLOCATOR)


def prepare_precision(precision):
    """Before TensorFlow starts: turns its oneDNN on (TF_ENABLE_ONEDNN_OPTS=1) for a network computing in
    `precision` bfloat16, whose CPU kernels are fast only through oneDNN, unless the user set the variable.
    On a GPU oneDNN is not used, so a bfloat16 request sets it whatever the device."""
    if precision == "bfloat16":
        os.environ.setdefault(ONEDNN_VARIABLE, BFLOAT16_ONEDNN_OPTS)


def onednn_setting():
    """TensorFlow's TF_ENABLE_ONEDNN_OPTS in this process, None where unset: as it was when import_tensorflow
    started TensorFlow, else as it is now (TensorFlow not started yet, or imported by someone else)."""
    return _settings["onednn_at_start"] if "onednn_at_start" in _settings else os.environ.get(ONEDNN_VARIABLE)


def onednn_on():
    """Whether TensorFlow's oneDNN is on in this process (`onednn_setting`), read as TensorFlow reads it on
    the CPUs that compute bfloat16 (ONEDNN_OFF_VALUES)."""
    setting = onednn_setting()
    return setting is None or setting.lower() not in ONEDNN_OFF_VALUES


def wants_start_up_logs():
    """Whether TensorFlow's C++ start-up lines are kept: with -v, or when the user set the log level."""
    return _settings["verbose"] or LOG_LEVEL_VARIABLE in os.environ


def is_start_up_line(line):
    """Whether a line on stderr is one of TensorFlow's C++ start-up lines, which a quiet import hides."""
    return START_UP_LINE.match(line) is not None


def writes_to_file_descriptor_2(stream):
    """Whether the text stream `stream` writes to file descriptor 2 (not a StringIO or another file)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def native_stderr(keep=None, python_to_console=False):
    """Runs the block with file descriptor 2, where native code (C++ logging, child processes)
    writes, caught in a temporary file; afterwards writes on sys.stderr the caught lines that
    `keep(line)` accepts. With `keep` None, descriptor 2 goes to /dev/null for the block.

    With `python_to_console`, Python's own sys.stderr, when it writes to descriptor 2, is
    pointed for the block at a duplicate of the console's descriptor, so that its lines (error
    messages, progress bars) reach the console as they are written instead of being caught.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    previous = sys.stderr
    console = None
    if python_to_console and writes_to_file_descriptor_2(previous):
        console = os.fdopen(
            os.dup(saved), "w", buffering=1, encoding=previous.encoding, errors="backslashreplace"
        )
        sys.stderr = console
    # What nothing is kept of goes to /dev/null, so that a long block (a Ray run) fills no file.
    with tempfile.TemporaryFile(mode="w+b") if keep is not None else open(os.devnull, "wb") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            if console is not None:
                sys.stderr = previous
                console.close()
            os.dup2(saved, 2)
            os.close(saved)
            if keep is not None:
                caught.seek(0)
                lines = caught.read().decode("utf-8", "replace").splitlines(keepends=True)
                previous.write("".join(line for line in lines if keep(line)))
                previous.flush()


def usable_cores():
    """The number of cores this process may run on."""
    return len(os.sched_getaffinity(0))


def thread_pool_sizes():
    """The (inter-op, intra-op) thread counts TensorFlow is started with (see the module's docstring)."""
    return (
        int(os.environ.get(INTER_OP_VARIABLE, INTER_OP_THREADS)),
        int(os.environ.get(INTRA_OP_VARIABLE, usable_cores())),
    )


def import_tensorflow():
    """The tensorflow module, imported as `configure` set (its defaults when it was not called):
    without TensorFlow's C++ start-up lines unless wanted.

    TensorFlow reads its log level once, during the import; the quiet level is then
    taken out of the environment again, so that child processes see the user's.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    configure(_settings["verbose"])
    _settings["onednn_at_start"] = os.environ.get(ONEDNN_VARIABLE)
    if wants_start_up_logs():
        import tensorflow

        return tensorflow
    os.environ[LOG_LEVEL_VARIABLE] = QUIET_LOG_LEVEL
    try:
        with native_stderr(keep=lambda line: not is_start_up_line(line)):
            import tensorflow
    finally:
        del os.environ[LOG_LEVEL_VARIABLE]
    return tensorflow


def keras_config_backend():
    """The "backend" field of Keras' keras.json, or None where there is no such file or field."""
    home = os.environ.get(KERAS_HOME_VARIABLE)
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(home), KERAS_CONFIG_NAME), encoding="utf-8") as config:
            backend = json.load(config).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def backend_name():
    """The Keras backend of this process: Keras' own once it is imported; before, the one it will take
    (KERAS_BACKEND, else keras.json, else TensorFlow)."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if KERAS_BACKEND_VARIABLE in os.environ:  # even empty, as keras/src/backend/config.py reads it
        return os.environ[KERAS_BACKEND_VARIABLE]
    return keras_config_backend() or DEFAULT_BACKEND


def backend_source():
    """Where the backend of this process was chosen: '--backend', 'KERAS_BACKEND', 'keras.json' or 'the default'
    (as it was when Keras was imported: Keras writes a keras.json naming its default where there is none)."""
    if "source" in _settings:
        return _settings["source"]
    if _settings["backend_option"]:
        return "--backend"
    if KERAS_BACKEND_VARIABLE in os.environ:
        return KERAS_BACKEND_VARIABLE
    return KERAS_CONFIG_NAME if keras_config_backend() else "the default"


def backend_problem():
    """Why Keras cannot run here on the backend chosen for this process, or None: a backend this
    project does not support, or one whose framework is not installed."""
    name = backend_name()
    if name not in BACKENDS:
        return (
            f"Keras backend {name!r} (from {backend_source()}) is not supported; "
            f"choose one of {', '.join(BACKENDS)}"
        )
    if importlib.util.find_spec(BACKEND_MODULES[name]) is None:
        return (
            f"the Keras backend {name} (from {backend_source()}) needs {BACKEND_TITLES[name]}, which is not "
            f"installed: pip install -r {BACKEND_REQUIREMENTS[name]}"
        )
    return None


def import_keras():
    """The keras module on the backend chosen for this process (`backend_name`); with TensorFlow, that
    is imported first as `import_tensorflow` does (quietly, its thread pools set)."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    configure(_settings["verbose"])
    _settings["source"] = backend_source()
    if backend_name() == "tensorflow":
        import_tensorflow()
    import keras

    return keras


def precision_problem(precision, gpus=None, cpu_bfloat16=True):
    """Why the network cannot compute in `precision`, or None: an unknown precision, or, given the
    `gpus` visible to this process (pspnet_keras.backend.gpu_names(); None leaves that unchecked), a
    mixed one without a GPU, which the backends' CPU kernels emulate slower than float32; except
    bfloat16 where `cpu_bfloat16` (inference; training runs it on a GPU only) and this CPU and
    backend compute it in hardware (`cpu_bfloat16_problem`)."""
    if precision not in PRECISION_POLICIES:
        return f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
    if gpus is None or gpus or precision == "float32":
        return None
    if precision == "bfloat16" and cpu_bfloat16:
        return cpu_bfloat16_problem()
    reason = NO_CPU_REASONS[precision]
    return f"precision {precision} needs a GPU and none is visible ({reason}); use float32 on the CPU"


def cpu_bfloat16_problem():
    """Why a bfloat16 network cannot run on this CPU, or None: the CPU lacks AVX512_BF16 and AMX
    (pspnet_keras/cpu.py), the backend is not TensorFlow, or TensorFlow started with oneDNN off."""
    if not cpu.computes_bfloat16():
        return (
            f"precision bfloat16 on the CPU needs {cpu.BFLOAT16_SETS}, and {cpu.bfloat16_absence()}; "
            "use float32 or a GPU"
        )
    backend = backend_name()
    if backend != CPU_BFLOAT16_BACKEND:
        return (
            f"precision bfloat16 on the CPU runs on TensorFlow only (the only backend measured faster in "
            f"bfloat16 than in float32 on the CPU; {BACKEND_TITLES.get(backend, backend)} was not measured); "
            "use --backend tensorflow or float32"
        )
    if not onednn_on():
        return (
            f"precision bfloat16 on the CPU needs TensorFlow's oneDNN, which was off when TensorFlow started "
            f"({ONEDNN_VARIABLE}={onednn_setting()}); "
            f"set {ONEDNN_VARIABLE}=1 before TensorFlow starts, or use float32"
        )
    return None


def available_memory():
    """The bytes of memory this process can still take: the kernel's MemAvailable (proc(5)), bounded
    by the address-space limit (RLIMIT_AS) when one is set; None where neither is known."""
    import resource

    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        found.append(limit)
    return min(found) if found else None


def allocation_problem(size, what):
    """Why `size` bytes for `what` ("a batch of 8 crops of 473 px") cannot be allocated here, or None.

    Checked before the work starts, so that an impossible request is one line at once
    instead of an out-of-memory failure later.
    """
    available = available_memory()
    if available is None or size <= available:
        return None
    return f"{what} needs at least {size / 2**30:.1f} GiB of memory; this machine has {available / 2**30:.1f} GiB free"
