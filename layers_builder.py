"""The three released PSPNet networks in Keras 3, as the Caffe deploy nets compute them.

Reference: Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, and the Caffe
release (hszhao/PSPNet, evaluation/prototxt). Layer names are the Caffe names with
`/bn` replaced by `_bn`, so weights load by name from the published Keras-2 `.h5`
files and from `weight_converter.py`'s output.

The networks take a (S, S, 3) float32 image in BGR order with the training mean
subtracted and return (S, S, classes) logits, as the deploy nets do; the softmax
belongs to inference.

One layer is computed differently from Caffe, with the same result: conv5_4
(PyramidConvolution) takes the pyramid branches at their bin resolution instead of
their upsampled concatenation, which halves its cost (a fifth of PSPNet-50's).
"""

import zipfile

import numpy as np

from pspnet_keras import runtime

runtime.import_keras()  # before Keras: its backend chosen and started as the commands start it

import keras
from keras import layers
from keras import ops

import utils
from pspnet_keras import backend
from pspnet_keras import models
from pspnet_keras.keras2_weights import RESNET101_ONLY_LAYER
from pspnet_keras.keras2_weights import WeightsError
from pspnet_keras.keras2_weights import read_weights
from pspnet_keras.keras2_weights import weights_layout
from pspnet_keras.keras2_weights import write_weights
from pspnet_keras.models import BLOCKS_PER_STAGE
from pspnet_keras.models import BN_EPSILON
from pspnet_keras.models import BN_MOMENTUM
from pspnet_keras.models import DROPOUT_RATE
from pspnet_keras.models import HEAD_CHANNELS
from pspnet_keras.models import OUTPUT_STRIDE
from pspnet_keras.models import PYRAMID_BINS
from pspnet_keras.models import PYRAMID_CHANNELS
from pspnet_keras.models import STAGE_DILATIONS
from pspnet_keras.models import STAGE_WIDTHS
from pspnet_keras.models import feature_size
from pspnet_keras.runtime import PRECISION_POLICIES

# The custom layers are registered as "pspnet>Interp" and "pspnet>PyramidConvolution", so that
# keras.saving.load_model opens a `.keras` archive of a network once this module is imported.
SERIALIZATION_PACKAGE = "pspnet"
# Keras' own default for convolution kernels, kept for a network that is trained.
DEFAULT_INITIALIZER = "glorot_uniform"
# The starting value of each kind of weight in Keras' Conv2D and BatchNormalization (their defaults), in the
# order of the layer's weights, which is the order of a weights file's arrays.
CONVOLUTION_WEIGHTS = (("kernel_initializer", 0.0), ("bias_initializer", 0.0))
BATCH_NORM_WEIGHTS = (
    ("gamma_initializer", 1.0),
    ("beta_initializer", 0.0),
    ("moving_mean_initializer", 0.0),
    ("moving_variance_initializer", 1.0),
)
FILL_INITIALIZERS = {0.0: "zeros", 1.0: "ones"}


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class Interp(layers.Layer):
    """Caffe's `Interp` layer: bilinear resizing with aligned corners.

    The output size is either given (`height`, `width`) or follows from
    `zoom_factor`: out = in + (in - 1) * (zoom_factor - 1). Output pixel i samples
    the input at s = i * (in - 1) / (out - 1), computed in float32 exactly as
    Caffe's `caffe_cpu_interp2` does, so corners map onto corners.
    """

    def __init__(self, height=None, width=None, zoom_factor=None, **kwargs):
        super().__init__(**kwargs)
        if (height is None) != (width is None):
            raise ValueError("Interp needs both height and width, or neither.")
        if (height is None) == (zoom_factor is None):
            raise ValueError("Interp needs either height and width or zoom_factor.")
        self.height = height
        self.width = width
        self.zoom_factor = zoom_factor

    def output_size(self, in_height, in_width):
        """The (height, width) this layer produces from an input of the given size."""
        if self.zoom_factor is None:
            return self.height, self.width
        zoom = self.zoom_factor
        return in_height + (in_height - 1) * (zoom - 1), in_width + (in_width - 1) * (zoom - 1)

    def build(self, input_shape):
        out_height, out_width = self.output_size(input_shape[1], input_shape[2])
        self.row_matrix = interpolation_matrix(input_shape[1], out_height)
        self.column_matrix = interpolation_matrix(input_shape[2], out_width)

    def call(self, inputs):
        return self.upsample(inputs, len(self.row_matrix), len(self.column_matrix))

    def upsample(self, inputs, height, width):
        """The first `height` rows and `width` columns of this layer's output for `inputs`."""
        column_weights = graph_constant(self.column_matrix, inputs.dtype)[:width]
        row_weights = graph_constant(self.row_matrix, inputs.dtype)[:height]
        columns = ops.einsum("pw,bhwc->bhpc", column_weights, inputs)
        rows = ops.tensordot(row_weights, columns, axes=[[1], [1]])
        return ops.transpose(rows, (1, 0, 2, 3))

    def compute_output_shape(self, input_shape):
        out_height, out_width = self.output_size(input_shape[1], input_shape[2])
        return (input_shape[0], out_height, out_width, input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(height=self.height, width=self.width, zoom_factor=self.zoom_factor)
        return config


def graph_constant(array, dtype):
    """`array` as a constant of the computation being traced (a Const node of a tf.function graph).

    The matrices of Interp and PyramidConvolution are kept as NumPy arrays and made
    tensors in call(): a tensor made in build() is captured by every traced function
    as an outside value, which tf2onnx turns into an extra graph input that ONNX
    Runtime then requires; a constant made while tracing is part of the graph.
    They are not weights, so weights files and `layer.weights` stay as they are.
    """
    return ops.convert_to_tensor(array, dtype=dtype)


def interpolation_matrix(in_size, out_size):
    """The (out_size, in_size) matrix of Caffe's align-corners linear interpolation."""
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    if out_size == in_size:
        np.fill_diagonal(matrix, 1.0)
        return matrix
    ratio = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    positions = ratio * np.arange(out_size, dtype=np.float32)
    lower = positions.astype(np.int64)
    upper = np.where(lower < in_size - 1, lower + 1, lower)
    fraction = positions - lower.astype(np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), np.float32(1) - fraction)
    np.add.at(matrix, (rows, upper), fraction)
    return matrix


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class PyramidConvolution(layers.Conv2D):
    """Caffe's `conv5_3_concat` + `conv5_4`: a 3x3 convolution of a map and its upsampled pyramid.

    Takes [features, branch, ...]: an (H, W) feature map and pyramid branches at
    their bin resolution. Computes the 3x3 convolution (pad 1, no bias) of the
    concatenation of the features and the branches upsampled to (H, W) by `Interp`,
    in that order, with the kernel of that convolution over all channels. The
    upsampled branches are never formed: for each kernel tap, a branch's share is
    the branch times the tap's weights, upsampled by interpolation matrices shifted
    by the tap's offset (rows that reach into the zero padding are zero), which
    costs a small fraction of convolving the upsampled branches.
    """

    def __init__(self, filters, **kwargs):
        kwargs.update(kernel_size=3, padding="same", use_bias=False)
        super().__init__(filters, **kwargs)
        self.input_spec = None

    def build(self, input_shape):
        features, *branches = input_shape
        channels = features[-1] + sum(branch[-1] for branch in branches)
        super().build((*features[:-1], channels))
        self.input_spec = None
        self.row_taps = [shifted_interpolation(branch[1], features[1]) for branch in branches]
        self.column_taps = [shifted_interpolation(branch[2], features[2]) for branch in branches]

    def call(self, inputs):
        features, *branches = inputs
        kernel = self.kernel
        start = features.shape[-1]
        outputs = self.convolution_op(features, kernel[:, :, :start])
        for branch, row_taps, column_taps in zip(branches, self.row_taps, self.column_taps):
            rows = graph_constant(row_taps, features.dtype)
            columns = graph_constant(column_taps, features.dtype)
            end = start + branch.shape[-1]
            taps = ops.einsum("bijc,uvck->buvijk", branch, kernel[:, :, start:end])
            taps = ops.einsum("vxj,buvijk->buixk", columns, taps)
            outputs = outputs + ops.einsum("uyi,buixk->byxk", rows, taps)
            start = end
        return outputs

    def compute_output_shape(self, input_shape):
        """The features' shape with `filters` channels (Conv2D.build asks with the concatenation's shape)."""
        pyramid = isinstance(input_shape[0], (list, tuple))
        return super().compute_output_shape(input_shape[0] if pyramid else input_shape)


def shifted_interpolation(in_size, out_size):
    """(3, out_size, in_size): the interpolation matrix read at offsets -1, 0, +1, zero outside."""
    padded = np.pad(interpolation_matrix(in_size, out_size), ((1, 1), (0, 0)))
    return np.stack([padded[tap : tap + out_size] for tap in range(3)])


def check_input_size(input_size):
    """Refuses input sizes at which the network is not the Caffe network scaled.

    The pyramid pools the conv5_3 map of side F into 1, 2, 3 and 6 bins exactly, so F
    must be a multiple of 6, and the final 8x Interp returns 8F - 7 pixels, which must
    be the input size: S = 8F - 7 = 48k - 7 (41, 89, ..., 233, ..., 473, ..., 713, ...).
    """
    side = feature_size(input_size)
    if input_size < 41 or side % 6 or OUTPUT_STRIDE * side - 7 != input_size:
        raise ValueError(f"input size {models.crop_size_problem(input_size)}; the released models use 473 and 713.")


class HostStart(keras.initializers.Initializer):
    """A weight's starting value made in host memory: `array` where its shape is the weight's, else
    the weight filled with `fill`.

    Keras' own "zeros" and "ones" are backend ops, which JAX compiles once per weight shape
    (about 1.3 s for a PSPNet-50 on 2 cores); a NumPy array is copied in as it is
    (backend.from_host). Only build_pspnet uses it, and puts Keras' own initializers back
    in the layers afterwards (forget_host_starts), so that a saved model's configuration
    holds no arrays.
    """

    def __init__(self, array=None, fill=0.0):
        self.array = array
        self.fill = fill

    def __call__(self, shape, dtype=None):
        if self.array is not None and self.array.shape == tuple(shape):
            return backend.from_host(self.array.astype(dtype or "float32", copy=False))
        return backend.from_host(np.full(shape, self.fill, dtype=dtype or "float32"))


class StartingWeights:
    """How the weighted layers of a network being built start: from `arrays` ({layer name: [arrays]},
    as keras2_weights.read_weights gives them) where they are given, else at Keras' random
    initialisation (`initialized`) or at zero (kernels) and Keras' BN defaults."""

    def __init__(self, arrays=None, initialized=True):
        self.arrays = arrays or {}
        self.initialized = initialized

    def host_starts(self, name, weights):
        """{initializer keyword: HostStart} of layer `name` whose weights are `weights` ((keyword, fill), in
        order)."""
        arrays = self.arrays.get(name, [])
        return {
            keyword: HostStart(arrays[index] if index < len(arrays) else None, fill)
            for index, (keyword, fill) in enumerate(weights)
        }

    def convolution(self, name):
        """The initializer keywords of convolution layer `name`."""
        if name in self.arrays or not self.initialized:
            return self.host_starts(name, CONVOLUTION_WEIGHTS)
        return {"kernel_initializer": DEFAULT_INITIALIZER}

    def batch_norm(self, name):
        """The initializer keywords of BatchNormalization layer `name` (Keras' defaults when initialized)."""
        if name in self.arrays or not self.initialized:
            return self.host_starts(name, BATCH_NORM_WEIGHTS)
        return {}


def forget_host_starts(model):
    """Puts Keras' "zeros" or "ones" in place of every HostStart initializer of `model`'s layers."""
    for layer in model.layers:
        for keyword, _ in CONVOLUTION_WEIGHTS + BATCH_NORM_WEIGHTS:
            start = getattr(layer, keyword, None)
            if isinstance(start, HostStart):
                setattr(layer, keyword, keras.initializers.get(FILL_INITIALIZERS[start.fill]))


def batch_norm(x, name, starts, relu=True):
    """Caffe `BN` named `name` (+ `ReLU`) on the output of convolution `name`."""
    x = layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn", **starts.batch_norm(f"{name}_bn")
    )(x)
    if relu:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def conv_bn(x, filters, kernel_size, name, starts, strides=1, dilation=1, relu=True):
    """Caffe `Convolution` (no bias, symmetric padding) + `BN` (+ `ReLU`) named `name`; its weights start
    as `starts` (StartingWeights) says."""
    pad = dilation * (kernel_size - 1) // 2
    if strides > 1 and pad:
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, dilation_rate=dilation, use_bias=False, name=name,
        **starts.convolution(name),
    )(x)
    return batch_norm(x, name, starts, relu)


def max_pool_ceil(x, name):
    """Caffe's 3x3 stride-2 pad-1 max pooling with its ceil-mode output size.

    The input follows a ReLU, so zero padding gives the same maxima as Caffe's
    padding, which windows never take.
    """
    size = x.shape[1]
    out = -(-(size - 1) // 2) + 1
    extra = 2 * (out - 1) + 3 - size - 1
    x = layers.ZeroPadding2D(((1, extra), (1, extra)), name=f"{name}_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name=name)(x)


def stem(x, starts):
    """conv1_1..conv1_3 and pool1: the deep stem, output stride 4."""
    x = conv_bn(x, 64, 3, "conv1_1_3x3_s2", starts, strides=2)
    x = conv_bn(x, 64, 3, "conv1_2_3x3", starts)
    x = conv_bn(x, 128, 3, "conv1_3_3x3", starts)
    return max_pool_ceil(x, "pool1_3x3_s2")


def bottleneck(x, width, name, starts, strides=1, dilation=1, project=False, stride_on_3x3=False):
    """Residual bottleneck `name` (e.g. conv3_1): 1x1 reduce, 3x3, 1x1 increase, plus shortcut.

    A strided block puts the stride on the 1x1 reduce (ResNet-50) or on the 3x3
    (`stride_on_3x3`, ResNet-101), as the released prototxts do.
    """
    reduce_strides, middle_strides = (1, strides) if stride_on_3x3 else (strides, 1)
    shortcut = x
    if project:
        shortcut = conv_bn(x, 4 * width, 1, f"{name}_1x1_proj", starts, strides=strides, relu=False)
    x = conv_bn(x, width, 1, f"{name}_1x1_reduce", starts, strides=reduce_strides)
    x = conv_bn(x, width, 3, f"{name}_3x3", starts, strides=middle_strides, dilation=dilation)
    x = conv_bn(x, 4 * width, 1, f"{name}_1x1_increase", starts, relu=False)
    x = layers.Add(name=name)([shortcut, x])
    return layers.Activation("relu", name=f"{name}_relu")(x)


def residual_stages(x, depth, starts):
    """Stages conv2..conv5 of the dilated ResNet: output stride 8, dilations 2 and 4."""
    stride_on_3x3 = depth == 101
    for stage, (blocks, width, dilation) in enumerate(
        zip(BLOCKS_PER_STAGE[depth], STAGE_WIDTHS, STAGE_DILATIONS), start=2
    ):
        for block in range(1, blocks + 1):
            x = bottleneck(
                x,
                width,
                f"conv{stage}_{block}",
                starts,
                strides=2 if stage == 3 and block == 1 else 1,
                dilation=dilation,
                project=block == 1,
                stride_on_3x3=stride_on_3x3,
            )
    return x


def pyramid_pooling_module(x, starts):
    """conv5_3 and its pyramid: [conv5_3, pool6, pool3, pool2, pool1] branches at bin resolution.

    Each branch is conv5_3 average-pooled into bins x bins and passed through its
    1x1 convolution. Caffe then upsamples the branches to conv5_3's size and
    concatenates them to it; conv5_4 (PyramidConvolution) computes that from these.
    """
    side = x.shape[1]
    pyramid = [x]
    for bins in PYRAMID_BINS:
        name = f"conv5_3_pool{bins}"
        kernel = side // bins
        branch = layers.AveragePooling2D(kernel, strides=kernel, name=name)(x)
        pyramid.append(conv_bn(branch, PYRAMID_CHANNELS, 1, f"{name}_conv", starts))
    return pyramid


def head(pyramid, classes, starts):
    """conv5_4 over the pyramid, dropout, the conv6 classifier and the 8x upsampling of its logits."""
    x = PyramidConvolution(HEAD_CHANNELS, name="conv5_4", **starts.convolution("conv5_4"))(pyramid)
    x = batch_norm(x, "conv5_4", starts)
    x = layers.Dropout(DROPOUT_RATE, name="conv5_4_dropout")(x)
    x = layers.Conv2D(classes, 1, name="conv6", **starts.convolution("conv6"))(x)
    return Interp(zoom_factor=OUTPUT_STRIDE, name="conv6_interp")(x)


def build_pspnet(model, input_size=None, precision="float32", initialized=True, weights=None):
    """The Keras model of `model` (a models.ModelConfig or a released model's name), returning logits.

    `input_size` defaults to the model's crop size (473, or 713 for Cityscapes),
    where a released network is exactly the Caffe deploy net. Other sizes S = 48k - 7
    give the same network scaled (pyramid kernels F/bins for a conv5_3 map of side F);
    any other size raises ValueError.

    `precision` (a key of PRECISION_POLICIES) sets the Keras dtype
    policy; the mixed ones keep float32 weights and compute in 16 bits.

    `weights` ({layer name: [arrays]}, as keras2_weights.read_weights gives them) are
    the starting values of the layers they name where their shapes fit (check_weights
    says whether they all do): the network is built with its weights at once, without
    a value to overwrite. With `initialized` False, the other kernels start at zero
    instead of Keras' random initialisation, for a network whose weights are loaded
    next: on JAX the random initialisation compiles a function per kernel shape (7 of
    the 9 s a PSPNet-50 build took on 2 cores). Starting values are made in host memory
    (HostStart), which no backend compiles anything for.
    """
    config = models.model_config(model)
    problem = runtime.precision_problem(precision)
    if problem:
        raise ValueError(problem)
    input_size = config.crop_size if input_size is None else input_size
    check_input_size(input_size)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISION_POLICIES[precision])
    try:
        inputs = keras.Input((input_size, input_size, 3), name="data")
        starts = StartingWeights(weights, initialized)
        x = stem(inputs, starts)
        x = residual_stages(x, config.depth, starts)
        x = pyramid_pooling_module(x, starts)
        outputs = head(x, config.classes, starts)
        network = keras.Model(inputs, outputs, name=config.name)
    finally:
        keras.config.set_dtype_policy(policy)
    forget_host_starts(network)
    return network


def split_upsampling(model):
    """(a model of the same weights returning conv6's logits at feature resolution, conv6_interp).

    For inference that upsamples only the part of a crop it needs.
    """
    logits = keras.Model(model.input, model.get_layer("conv6").output, name=f"{model.name}_conv6")
    return logits, model.get_layer("conv6_interp")


def file_weight_shapes(model):
    """The shapes of the arrays a weights file holds for `model`, by layer name."""
    return {layer.name: [tuple(weight.shape) for weight in layer.weights] for layer in model.layers if layer.weights}


def and_more(names):
    """` (and N more)` for a list of more than one name, else nothing."""
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def description_mismatch(model, arrays, path, description):
    """WeightsError naming the field of the description file `description` that the weights at `path`
    contradict (its depth or its classes), or None when the two agree on both."""
    depth, classes = weights_layout(arrays)
    described_depth = 101 if RESNET101_ONLY_LAYER in file_weight_shapes(model) else 50
    if depth != described_depth:
        return WeightsError(
            f"{description}: field 'depth' says {described_depth}, but the weights {path} are a ResNet-{depth}'s"
        )
    described_classes = model.get_layer("conv6").filters
    if classes is not None and classes != described_classes:
        return WeightsError(
            f"{description}: field 'classes' says {described_classes}, but the weights {path} hold {classes} "
            "classes (layer conv6)"
        )
    return None


def load_weights(model, path, fresh=(), description=None):
    """Fills every weighted layer of `model` from the HDF5 file at `path`, by layer name.

    Layers named in `fresh` keep their initialisation, whatever the file holds for them
    (a classifier trained for other classes, say). Raises WeightsError as check_weights
    does.
    """
    arrays = read_weights(path)
    check_weights(model, arrays, path, fresh, description)
    for layer in model.layers:
        if layer.weights and layer.name not in fresh:
            layer.set_weights(arrays[layer.name])


def build_loaded_pspnet(model, path, precision="float32", description=None):
    """build_pspnet's network of `model` at its crop size with the weights of the HDF5 file at `path`,
    built with them as its starting values (what load_weights would put in, without a first value
    to overwrite). Raises WeightsError as check_weights does."""
    arrays = read_weights(path)
    network = build_pspnet(model, precision=precision, initialized=False, weights=arrays)
    check_weights(network, arrays, path, description=description)
    return network


def check_weights(model, arrays, path, fresh=(), description=None):
    """Raises WeightsError unless `arrays` ({layer name: [arrays]}, read from the weights file at
    `path`) fit every weighted layer of `model` but those named in `fresh`: naming the file and the
    layer when another layer of the model is missing from the file, the file holds a layer the
    model does not have, or an array's shape does not match; naming the field of `description`
    (the JSON file the model was built from) when that is what the weights contradict.
    """
    mismatch = description_mismatch(model, arrays, path, description) if description is not None else None
    if mismatch is not None:
        raise mismatch
    expected = {name: shapes for name, shapes in file_weight_shapes(model).items() if name not in fresh}
    unknown = sorted(set(arrays) - set(expected) - set(fresh))
    if unknown:
        raise WeightsError(f"{path}: layer {unknown[0]} is not in {model.name}{and_more(unknown)}")
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise WeightsError(f"{path}: no weights for layer {missing[0]} of {model.name}{and_more(missing)}")
    for name, shapes in expected.items():
        given = [array.shape for array in arrays[name]]
        if given != shapes:
            raise WeightsError(f"{path}: layer {name} has weights of shapes {given}, {model.name} expects {shapes}")


def save_weights(model, path):
    """Writes the weights of `model` in the layout of the published Keras-2 `.h5` files (see write_weights)."""
    layers = [
        (layer.name, [(weight.name, np.asarray(weight.numpy())) for weight in layer.weights])
        for layer in model.layers
        if layer.weights
    ]
    write_weights(path, layers)


def load_keras_archive(path, model):
    """The logits network saved in the Keras archive at `path` (export.py --format keras).

    `model` (a models.ModelConfig or a released model's name) is what the archive must
    hold: a PSPNet of its crop size and classes. Raises WeightsError naming the file
    for anything else: a missing or unreadable file, a file that is not a Keras
    archive, or the network of another model.
    """
    config = models.model_config(model)
    problem = utils.file_problem(path, what="weights file")
    if problem:
        raise WeightsError(f"{path}: {problem}")
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not a Keras archive (a .keras file is a zip archive)")
    try:
        network = keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as error:
        raise WeightsError(f"{path}: not a Keras archive this project can open ({first_line(error)})") from None
    layer_names = {layer.name for layer in network.layers} if isinstance(network, keras.Model) else set()
    if not {"conv6", "conv6_interp"} <= layer_names:
        raise WeightsError(f"{path}: the Keras archive does not hold a PSPNet")
    expected = (config.crop_size, config.crop_size, 3), config.classes
    found = tuple(network.input_shape[1:]), network.output_shape[-1]
    if found != expected:
        raise WeightsError(
            f"{path}: holds a network of {found[0][0]} px crops and {found[1]} classes; "
            f"{config.name} has {config.crop_size} px crops and {config.classes} classes"
        )
    return network


def first_line(error):
    """The first line of an exception's message, for one-line error messages."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
