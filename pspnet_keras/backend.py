"""What differs between the Keras backends at inference: compiling, devices and running out of memory.

The protocol (inference.py) is written once, on keras.ops and NumPy; this module
compiles its pieces with each backend's own compiler:
- TensorFlow: the network under tf.function, without AutoGraph (it has no Python
  control flow on tensors, and converting it took half of the first call's tracing
  time); the protocol's pieces of a crop (upsampling, softmax) eagerly: traced, they
  cost 0.4 s at the first call and ran no faster, 0.07-0.09 s a call either way, with
  the same results to the bit (bench/README.md, "Time to first result");
- JAX: jax.jit, a Keras model called through `stateless_call` so that its weights
  are arguments of the compiled function rather than constants folded into it
  (keras.io, "Writing a custom training loop in JAX"); crop sizes are static
  arguments, one compilation per size met; compiled executables are kept between
  runs (compile_cache.py);
- PyTorch: eager, under torch.inference_mode (no autograd records).

Devices are listed through the backend in use; each backend's out-of-memory
error (TensorFlow's ResourceExhaustedError, XLA's RESOURCE_EXHAUSTED status,
torch.OutOfMemoryError) is recognised by `is_out_of_memory`.
"""

import contextlib

from pspnet_keras import runtime

keras = runtime.import_keras()
from keras import ops  # noqa: E402 (after the backend is chosen and TensorFlow set up)

# The status XLA (JAX's compiler) reports when an allocation fails.
XLA_OUT_OF_MEMORY = "RESOURCE_EXHAUSTED"


def framework_version():
    """'<framework> <version>' of the backend in use, e.g. 'JAX 0.10.2'."""
    module = __import__(runtime.BACKEND_MODULES[runtime.backend_name()])
    return f"{runtime.BACKEND_TITLES[runtime.backend_name()]} {module.__version__}"


def gpu_names():
    """The GPUs the backend in use sees (after CUDA_VISIBLE_DEVICES), by model name ('NVIDIA H100 80GB
    HBM3'); empty on a CPU-only machine."""
    backend = runtime.backend_name()
    if backend == "tensorflow":
        import tensorflow as tf

        return [
            tf.config.experimental.get_device_details(device).get("device_name", device.name)
            for device in tf.config.list_physical_devices("GPU")
        ]
    if backend == "jax":
        import jax

        return [device.device_kind for device in jax.devices() if device.platform != "cpu"]
    import torch

    return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]


def is_out_of_memory(error):
    """Whether `error` says that memory ran out: NumPy's MemoryError or the backend's own error."""
    if isinstance(error, MemoryError):
        return True
    backend = runtime.backend_name()
    if backend == "tensorflow":
        import tensorflow as tf

        return isinstance(error, tf.errors.ResourceExhaustedError)
    if backend == "jax":
        import jax

        return isinstance(error, jax.errors.JaxRuntimeError) and XLA_OUT_OF_MEMORY in str(error)
    import torch

    return isinstance(error, torch.OutOfMemoryError)


@contextlib.contextmanager
def inference_mode():
    """Runs the block without recording anything for gradients where the backend would (PyTorch)."""
    if runtime.backend_name() != "torch":
        yield
        return
    import torch

    with torch.inference_mode():
        yield


def compile_network(network, batch_shape):
    """network(batch) as float32, compiled for float32 batches of `batch_shape` (N, S, S, 3).

    `network` is a Keras model, or any callable of keras.ops (a stand-in in the tests).
    Returns a function of a NumPy batch giving a tensor of the backend.
    """
    backend = runtime.backend_name()

    def logits(batch):
        return ops.cast(network(batch, training=False), "float32")

    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(logits, input_signature=[tf.TensorSpec(batch_shape, tf.float32)], autograph=False)
    if backend == "jax":
        if isinstance(network, keras.Model):
            return stateless_function(network)
        return CachedJit(logits)

    def eager(batch):
        with inference_mode():
            return logits(ops.convert_to_tensor(batch))

    return eager


def stateless_function(model):
    """model(batch) as float32 under jax.jit, its weights passed in at each call (JAX only)."""

    def stateless_logits(trainable, non_trainable, batch):
        outputs, _ = model.stateless_call(trainable, non_trainable, batch, training=False)
        return ops.cast(outputs, "float32")

    logits = CachedJit(stateless_logits)

    def call(batch):
        trainable = [variable.value for variable in model.trainable_variables]
        non_trainable = [variable.value for variable in model.non_trainable_variables]
        return logits(trainable, non_trainable, batch)

    return call


class CachedJit:
    """`jax.jit(function, static_argnames=...)` whose executables come from the persistent compilation
    cache (compile_cache.compiled_jax): one per shape and dtype of the arguments and value of the
    static ones, lowered and looked up once per process."""

    def __init__(self, function, static_argnames=()):
        import jax

        self.jitted = jax.jit(function, static_argnames=static_argnames)
        self.static_argnames = tuple(static_argnames)
        self.executables = {}

    def __call__(self, *arguments, **keywords):
        import jax

        from pspnet_keras import compile_cache

        static = {name: keywords.pop(name) for name in self.static_argnames}
        leaves = jax.tree_util.tree_leaves((arguments, keywords))
        signature = (
            jax.tree_util.tree_structure((arguments, keywords)),
            tuple((ops.shape(leaf), str(leaf.dtype)) for leaf in leaves),
            tuple(sorted(static.items())),
        )
        if signature not in self.executables:
            lowered = self.jitted.lower(*arguments, **keywords, **static)
            self.executables[signature] = compile_cache.compiled_jax(lowered)
        return self.executables[signature](*arguments, **keywords)


def compile_sized(function):
    """function(*tensors, height, width) as each backend runs it best; `height` and `width` are Python ints.

    JAX compiles it once per (shape, height, width) met; TensorFlow and PyTorch run it eagerly.
    """
    if runtime.backend_name() == "jax":
        return CachedJit(function, static_argnames=("height", "width"))

    def eager(*tensors, height, width):
        with inference_mode():
            return function(*tensors, height=height, width=width)

    return eager


def from_host(array):
    """A NumPy array as a value Keras takes for a variable without compiling anything: the array
    itself, or on JAX the array put on the default device (jax.device_put). jnp.asarray, which Keras
    would call, compiles an identity function for each new shape (JAX 0.10)."""
    if runtime.backend_name() != "jax":
        return array
    import jax

    return jax.device_put(array)


def to_numpy(tensor):
    """A tensor of the backend as a NumPy array (copied from the device where it lies on one)."""
    if runtime.backend_name() == "torch":
        return tensor.detach().cpu().numpy()
    return ops.convert_to_numpy(tensor)
