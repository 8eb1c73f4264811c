"""Caffe's net and weight files, and the Caffe release's deploy nets rendered from this project's network.

The Caffe release of PSPNet (hszhao/PSPNet) describes each released net in a deploy
prototxt (evaluation/prototxt/*.prototxt, protobuf text format) and stores its weights
in a .caffemodel (one serialized NetParameter, protobuf binary format). Both are read
here with the protobuf library, through the messages and fields of caffe.proto
(src/caffe/proto/caffe.proto of hszhao/PSPNet) declared once in MESSAGES: every field
of the deploy nets' layer types that changes what a layer computes, the training fields the
release's prototxts carry (param multipliers, fillers, BN momentum and frozen), and
the fields that hold weights, legacy ones included (V1 `layers`, BlobProto's
num/channels/height/width and double_data). Fields not declared are skipped.

The fork has no Input layer: LayerParameter field 143, BVLC's input_param, is the
fork's interp_param. The deploy nets declare their input with `input` and `input_dim`.

`deploy_net` renders the release's deploy net of a model from the constants that
layers_builder builds the Keras network from: the same layers in the same order, with
the same names, blobs and parameters as the release's prototxt file of that model.
"""

import re

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message
from google.protobuf import message_factory
from google.protobuf import text_format

from pspnet_keras import models

# Protobuf field kinds of the declarations below.
OPTIONAL = "optional"
REPEATED = "repeated"
PACKED = "packed"  # repeated, written packed (caffe.proto's [packed = true])
SCALAR_TYPES = {
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
}
PROTO_PACKAGE = "caffe"

# caffe.proto of hszhao/PSPNet: (field, number, kind, type, default) of each message read or written here.
MESSAGES = {
    "BlobShape": (("dim", 1, PACKED, "int64"),),
    "BlobProto": (
        ("shape", 7, OPTIONAL, "BlobShape"),
        ("data", 5, PACKED, "float"),
        ("double_data", 8, PACKED, "double"),
        ("num", 1, OPTIONAL, "int32", "0"),
        ("channels", 2, OPTIONAL, "int32", "0"),
        ("height", 3, OPTIONAL, "int32", "0"),
        ("width", 4, OPTIONAL, "int32", "0"),
    ),
    "FillerParameter": (
        ("type", 1, OPTIONAL, "string", "constant"),
        ("value", 2, OPTIONAL, "float", "0"),
    ),
    "NetParameter": (
        ("input", 3, REPEATED, "string"),
        ("input_shape", 8, REPEATED, "BlobShape"),
        ("input_dim", 4, REPEATED, "int32"),
        ("layer", 100, REPEATED, "LayerParameter"),
        ("layers", 2, REPEATED, "V1LayerParameter"),
    ),
    "ParamSpec": (
        ("lr_mult", 3, OPTIONAL, "float", "1"),
        ("decay_mult", 4, OPTIONAL, "float", "1"),
    ),
    "LayerParameter": (
        ("name", 1, OPTIONAL, "string"),
        ("type", 2, OPTIONAL, "string"),
        ("bottom", 3, REPEATED, "string"),
        ("top", 4, REPEATED, "string"),
        ("param", 6, REPEATED, "ParamSpec"),
        ("blobs", 7, REPEATED, "BlobProto"),
        ("bn_param", 152, OPTIONAL, "BNParameter"),
        ("concat_param", 104, OPTIONAL, "ConcatParameter"),
        ("convolution_param", 106, OPTIONAL, "ConvolutionParameter"),
        ("dropout_param", 108, OPTIONAL, "DropoutParameter"),
        ("eltwise_param", 110, OPTIONAL, "EltwiseParameter"),
        ("interp_param", 143, OPTIONAL, "InterpParameter"),
        ("pooling_param", 121, OPTIONAL, "PoolingParameter"),
        ("relu_param", 123, OPTIONAL, "ReLUParameter"),
    ),
    "V1LayerParameter": (
        ("bottom", 2, REPEATED, "string"),
        ("top", 3, REPEATED, "string"),
        ("name", 4, OPTIONAL, "string"),
        ("blobs", 6, REPEATED, "BlobProto"),
    ),
    "BNParameter": (
        ("slope_filler", 1, OPTIONAL, "FillerParameter"),
        ("bias_filler", 2, OPTIONAL, "FillerParameter"),
        ("momentum", 3, OPTIONAL, "float", "0.9"),
        ("eps", 4, OPTIONAL, "float", "1e-5"),
        ("frozen", 5, OPTIONAL, "bool", "false"),
    ),
    "ConcatParameter": (
        ("axis", 2, OPTIONAL, "int32", "1"),
        ("concat_dim", 1, OPTIONAL, "uint32", "1"),
    ),
    "ConvolutionParameter": (
        ("num_output", 1, OPTIONAL, "uint32"),
        ("bias_term", 2, OPTIONAL, "bool", "true"),
        ("pad", 3, REPEATED, "uint32"),
        ("kernel_size", 4, REPEATED, "uint32"),
        ("stride", 6, REPEATED, "uint32"),
        ("dilation", 18, REPEATED, "uint32"),
        ("pad_h", 9, OPTIONAL, "uint32", "0"),
        ("pad_w", 10, OPTIONAL, "uint32", "0"),
        ("kernel_h", 11, OPTIONAL, "uint32"),
        ("kernel_w", 12, OPTIONAL, "uint32"),
        ("stride_h", 13, OPTIONAL, "uint32"),
        ("stride_w", 14, OPTIONAL, "uint32"),
        ("group", 5, OPTIONAL, "uint32", "1"),
        ("axis", 16, OPTIONAL, "int32", "1"),
        ("weight_filler", 7, OPTIONAL, "FillerParameter"),
        ("bias_filler", 8, OPTIONAL, "FillerParameter"),
    ),
    "DropoutParameter": (("dropout_ratio", 1, OPTIONAL, "float", "0.5"),),
    "EltwiseParameter": (
        ("operation", 1, OPTIONAL, "EltwiseOp", "SUM"),
        ("coeff", 2, REPEATED, "float"),
    ),
    "InterpParameter": (
        ("height", 1, OPTIONAL, "int32", "0"),
        ("width", 2, OPTIONAL, "int32", "0"),
        ("zoom_factor", 3, OPTIONAL, "int32", "1"),
        ("shrink_factor", 4, OPTIONAL, "int32", "1"),
        ("pad_beg", 5, OPTIONAL, "int32", "0"),
        ("pad_end", 6, OPTIONAL, "int32", "0"),
    ),
    "PoolingParameter": (
        ("pool", 1, OPTIONAL, "PoolMethod", "MAX"),
        ("pad", 4, OPTIONAL, "uint32", "0"),
        ("pad_h", 9, OPTIONAL, "uint32", "0"),
        ("pad_w", 10, OPTIONAL, "uint32", "0"),
        ("kernel_size", 2, OPTIONAL, "uint32"),
        ("kernel_h", 5, OPTIONAL, "uint32"),
        ("kernel_w", 6, OPTIONAL, "uint32"),
        ("stride", 3, OPTIONAL, "uint32", "1"),
        ("stride_h", 7, OPTIONAL, "uint32"),
        ("stride_w", 8, OPTIONAL, "uint32"),
        ("global_pooling", 12, OPTIONAL, "bool", "false"),
    ),
    "ReLUParameter": (("negative_slope", 1, OPTIONAL, "float", "0"),),
}
# Enums nested in the messages above: {message: {enum: {value name: number}}}.
ENUMS = {
    "EltwiseParameter": {"EltwiseOp": {"PROD": 0, "SUM": 1, "MAX": 2}},
    "PoolingParameter": {"PoolMethod": {"MAX": 0, "AVE": 1, "STOCHASTIC": 2}},
}
# Fields only training reads (learning-rate and decay multipliers, initial values, BN's
# moving-average momentum and freezing): a deploy net computes the same without them.
TRAINING_FIELDS = {
    "LayerParameter": ("param",),
    "ConvolutionParameter": ("weight_filler", "bias_filler"),
    "BNParameter": ("slope_filler", "bias_filler", "momentum", "frozen"),
}
# BlobProto's legacy 4-D dims (num, channels, height, width).
LEGACY_DIMS = ("num", "channels", "height", "width")

# Text-format files nest messages this deep at most: the deploy nets nest three levels
# (layer > bn_param > slope_filler); the limit keeps the parser's recursion bounded.
MAX_NESTING = 16
OPENING_BRACES = ("{", "<")
CLOSING_BRACES = ("}", ">")
# What a field's value starts with: a string, a number or identifier, or a message or list.
VALUE_START = re.compile(r"""[\w"'+\-.{<\[]""")

# The deploy nets as the release writes them (evaluation/prototxt/*.prototxt).
INPUT_BLOB = "data"
INPUT_BATCH = 1
INPUT_CHANNELS = 3
# The deep stem: (name, outputs, stride) of its 3x3 convolutions, then a 3x3 stride-2 pad-1 max pooling.
STEM_CONVOLUTIONS = (("conv1_1_3x3_s2", 64, 2), ("conv1_2_3x3", 64, 1), ("conv1_3_3x3", 128, 1))
STEM_POOL = "pool1_3x3_s2"
STEM_POOL_KERNEL = 3
STEM_POOL_STRIDE = 2
STEM_POOL_PAD = 1
# Residual blocks: 1x1 reduce to the stage width, 3x3, 1x1 increase to 4x the width; the
# first block of stage 3 downsamples by 2.
BOTTLENECK_EXPANSION = 4
FIRST_STAGE = 2
DOWNSAMPLING_STAGE = 3
# ResNet-101 strides that block's 3x3 convolution, ResNet-50 its 1x1 reduce.
STRIDED_3X3_DEPTHS = (101,)
WEIGHT_FILLER = "msra"
BN_SLOPE_FILL = 1.0
BN_BIAS_FILL = 0.0
# (lr_mult, decay_mult) of each blob of a layer, as the release's files give them: the
# pyramid and head learn at 10x, conv6's bias at 20x; BN statistics are not learned.
BACKBONE_CONVOLUTION_PARAMS = ((1, 1),)
BACKBONE_BN_PARAMS = ((1, 0), (1, 0), (0, 0), (0, 0))
HEAD_CONVOLUTION_PARAMS = ((10, 1),)
HEAD_BN_PARAMS = ((10, 0), (10, 0), (0, 0), (0, 0))
CLASSIFIER_PARAMS = ((10, 1), (20, 1))
# pspnet50_ADE20K_473.prototxt alone gives conv5_4/bn's mean a decay_mult of 1 (with lr_mult 0, no effect).
PARAMS_OF_LAYER = {("pspnet50_ade20k", "conv5_4/bn"): ((10, 0), (10, 0), (0, 1), (0, 0))}


class CaffeFormatError(ValueError):
    """Data that is not a well-formed prototxt or caffemodel; the message says where and what."""


def message_classes():
    """{message name: class} of MESSAGES, built with the protobuf library in a pool of their own."""
    file = descriptor_pb2.FileDescriptorProto(name="pspnet_caffe.proto", package=PROTO_PACKAGE, syntax="proto2")
    for message_name, fields in MESSAGES.items():
        declaration = file.message_type.add(name=message_name)
        enums = ENUMS.get(message_name, {})
        for enum_name, values in enums.items():
            enum = declaration.enum_type.add(name=enum_name)
            for value_name, number in values.items():
                enum.value.add(name=value_name, number=number)
        for name, number, kind, type_name, *default in fields:
            field = declaration.field.add(name=name, number=number, default_value=default[0] if default else None)
            field.label = field.LABEL_OPTIONAL if kind == OPTIONAL else field.LABEL_REPEATED
            if kind == PACKED:
                field.options.packed = True
            if type_name in SCALAR_TYPES:
                field.type = SCALAR_TYPES[type_name]
            elif type_name in enums:
                field.type = field.TYPE_ENUM
                field.type_name = f".{PROTO_PACKAGE}.{message_name}.{type_name}"
            else:
                field.type = field.TYPE_MESSAGE
                field.type_name = f".{PROTO_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PROTO_PACKAGE}.{name}"))
        for name in MESSAGES
    }


MESSAGE_CLASSES = message_classes()
NetParameter = MESSAGE_CLASSES["NetParameter"]


# --------------------------------------------------------------------------------------
# Reading


def located(line, column, what):
    """A CaffeFormatError 'line L, column C: what', long runs of text in `what` shortened."""
    return CaffeFormatError(f"line {line}, column {column}: " + re.sub(r"(\S{40})\S{20,}", r"\1...", what))


def structure_problem(text):
    """The first defect that protobuf's text parser reports without its line, as a located CaffeFormatError, or None.

    Those are blocks nested deeper than MAX_NESTING (the parser recurses without
    bound through the fields it skips) and a field without a value after its colon.
    """
    tokenizer = text_format.Tokenizer(text.split("\n"))
    depth = 0
    while not tokenizer.AtEnd():
        token = tokenizer.token
        tokenizer.NextToken()
        if token in OPENING_BRACES:
            depth += 1
            if depth > MAX_NESTING:
                error = tokenizer.ParseErrorPreviousToken("")
                return located(error.GetLine(), error.GetColumn(), f"blocks nested more than {MAX_NESTING} deep")
        elif token in CLOSING_BRACES:
            depth -= 1
        elif token == ":" and not VALUE_START.match(tokenizer.token):
            error = tokenizer.ParseError("")
            return located(error.GetLine(), error.GetColumn(), "a value is missing after ':'")
    return None


def parse_prototxt(text):
    """The NetParameter of a prototxt's text; CaffeFormatError naming the line and column of a defect.

    Fields that MESSAGES does not declare are skipped.
    """
    problem = structure_problem(text)
    if problem:
        raise problem
    net = NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as error:
        raise parse_error(error, text.split("\n")) from None
    return net


def parse_error(error, lines):
    """A protobuf ParseError as a located CaffeFormatError, without the quotation of its line."""
    line, column = error.GetLine(), error.GetColumn()
    if line is None:
        return CaffeFormatError(str(error))
    what = str(error).removeprefix(f"{line}:{column} : ").removeprefix(f"'{lines[line - 1]}': ")
    return located(line, column, what)


def parse_caffemodel(data):
    """The NetParameter of a caffemodel's bytes; CaffeFormatError when they are not a protobuf message."""
    net = NetParameter()
    try:
        net.ParseFromString(data)
    except message.DecodeError:
        raise CaffeFormatError("truncated or corrupt protobuf data") from None
    return net


def weight_layers(net):
    """[(name, type, blobs)] of the layers of a NetParameter that hold blobs, in file order.

    V1 `layers` have no type here ('').
    """
    layers = [(layer.name, layer.type, layer.blobs) for layer in net.layer if layer.blobs]
    return layers + [(layer.name, "", layer.blobs) for layer in net.layers if layer.blobs]


def blob_shape(blob):
    """The shape of a BlobProto as Caffe's Blob::FromProto takes it (src/caffe/blob.cpp).

    Any legacy num/channels/height/width field makes it the 4-D (num, channels,
    height, width); otherwise it is `shape`.
    """
    if any(blob.HasField(dim) for dim in LEGACY_DIMS):
        return tuple(getattr(blob, dim) for dim in LEGACY_DIMS)
    return tuple(blob.shape.dim)


def blob_values(blob):
    """The values of a BlobProto: `double_data` when it has any (as Caffe reads them), else `data`."""
    return blob.double_data if len(blob.double_data) else blob.data


# --------------------------------------------------------------------------------------
# Comparing nets


def field_text(container, field):
    """One field of a message in the text format on one line ('stride: 2'); '' when it is unset."""
    part = type(container)()
    value = getattr(container, field.name)
    if field.is_repeated:
        getattr(part, field.name).extend(value)
    elif container.HasField(field.name):
        if field.message_type is None:
            setattr(part, field.name, value)
        else:
            getattr(part, field.name).CopyFrom(value)
    return text_format.MessageToString(part, as_one_line=True)


def message_difference(given, expected, skipped=()):
    """(given text, expected text) of the first field where two messages differ, or None.

    A field of a nested message is shown inside its parent ('convolution_param {
    stride: 2 }'); `skipped` names fields of the top message left out.
    """
    for field in expected.DESCRIPTOR.fields:
        if field.name in skipped:
            continue
        nested = field.message_type is not None and not field.is_repeated
        if nested and given.HasField(field.name) and expected.HasField(field.name):
            inner = message_difference(getattr(given, field.name), getattr(expected, field.name))
            if inner:
                return tuple(f"{field.name} {{ {text} }}" if text else f"{field.name} {{ }}" for text in inner)
        elif field_text(given, field) != field_text(expected, field):
            return field_text(given, field), field_text(expected, field)
    return None


def equal_leading_layers(given, expected):
    """How many layers two NetParameters have in common before their first difference."""
    count = 0
    for given_layer, expected_layer in zip(given.layer, expected.layer):
        if given_layer != expected_layer:
            break
        count += 1
    return count


def shared_layers(given, expected):
    """How many layers of `given` are the same as the layer of their name in `expected`."""
    expected_layers = {layer.name: layer for layer in expected.layer}
    return sum(expected_layers.get(layer.name) == layer for layer in given.layer)


def clear_training_fields(container):
    """Clears the TRAINING_FIELDS of a message and of the messages in it."""
    for name in TRAINING_FIELDS.get(container.DESCRIPTOR.name, ()):
        container.ClearField(name)
    for field, value in container.ListFields():
        if field.message_type is not None:
            for item in value if field.is_repeated else [value]:
                clear_training_fields(item)


def deployed(net):
    """A copy of a NetParameter without the fields only training reads: what it computes as a deploy net."""
    copy = NetParameter()
    copy.CopyFrom(net)
    clear_training_fields(copy)
    return copy


def net_difference(given, expected, expected_name):
    """Where the NetParameter `given` first differs from `expected`, the net of `expected_name`; None if nowhere.

    Compares the input declaration, then every layer in order: name, type, bottoms,
    tops and every parameter.
    """
    header = message_difference(given, expected, skipped=("layer",))
    if header:
        return f"{header[0] or 'no input'} where {expected_name} has {header[1]}"
    index = equal_leading_layers(given, expected)
    if index < min(len(given.layer), len(expected.layer)):
        given_text, expected_text = message_difference(given.layer[index], expected.layer[index])
        return (
            f"layer {index + 1} ('{given.layer[index].name}') has {given_text or 'nothing'} "
            f"where {expected_name} has {expected_text or 'nothing'}"
        )
    if len(given.layer) < len(expected.layer):
        return (
            f"it ends after {len(given.layer)} layers where {expected_name} goes on with "
            f"'{expected.layer[index].name}' ({len(expected.layer)} layers)"
        )
    if len(given.layer) > len(expected.layer):
        return (
            f"layer {index + 1} ('{given.layer[index].name}') is after the end of {expected_name} "
            f"({len(expected.layer)} layers)"
        )
    return None


# --------------------------------------------------------------------------------------
# Following blobs through a net


def weight_shapes(net):
    """[(name, type, [Caffe blob shapes])] of the Convolution and BN layers of a deploy net, in order.

    Follows the channels of every blob from the input: a convolution makes
    num_output, a concatenation the sum of its bottoms, any other layer keeps its
    bottom's. Convolution blobs: kernel (O, I, k, k), and bias (O,) with bias_term;
    BN blobs: slope, bias, mean, variance, each (1, C, 1, 1).
    """
    channels = {name: net.input_dim[1] for name in net.input}
    shapes = []
    for layer in net.layer:
        bottoms = [channels[bottom] for bottom in layer.bottom]
        if layer.type == "Convolution":
            convolution = layer.convolution_param
            kernel = convolution.kernel_size[0]
            blobs = [(convolution.num_output, bottoms[0], kernel, kernel)]
            if convolution.bias_term:
                blobs.append((convolution.num_output,))
            shapes.append((layer.name, layer.type, blobs))
            outputs = convolution.num_output
        elif layer.type == "Concat":
            outputs = sum(bottoms)
        else:
            if layer.type == "BN":
                shapes.append((layer.name, layer.type, [(1, bottoms[0], 1, 1)] * 4))
            outputs = bottoms[0]
        for top in layer.top:
            channels[top] = outputs
    return shapes


# --------------------------------------------------------------------------------------
# Rendering the release's deploy nets


class DeployNet:
    """Writes the deploy NetParameter of a model layer by layer, from the architecture constants of models.py."""

    def __init__(self, config):
        self.config = config
        size = config.crop_size
        self.net = NetParameter(input=[INPUT_BLOB], input_dim=[INPUT_BATCH, INPUT_CHANNELS, size, size])

    def layer(self, name, layer_type, bottoms, top=None, params=()):
        """Appends a layer (top: its name) with one ParamSpec per (lr_mult, decay_mult) of `params`."""
        layer = self.net.layer.add(name=name, type=layer_type, bottom=bottoms, top=[top or name])
        for lr_mult, decay_mult in params:
            layer.param.add(lr_mult=lr_mult, decay_mult=decay_mult)
        return layer

    def convolution(
        self, name, bottom, outputs, kernel, stride=1, pad=None, dilation=1, params=BACKBONE_CONVOLUTION_PARAMS
    ):
        """A bias-free Convolution; `pad` is written when given, `dilation` when above 1."""
        convolution = self.layer(name, "Convolution", [bottom], params=params).convolution_param
        convolution.num_output = outputs
        if pad is not None:
            convolution.pad.append(pad)
        convolution.kernel_size.append(kernel)
        convolution.stride.append(stride)
        if dilation > 1:
            convolution.dilation.append(dilation)
        convolution.weight_filler.type = WEIGHT_FILLER
        convolution.bias_term = False

    def batch_norm(self, name, params=BACKBONE_BN_PARAMS, relu=True):
        """The fork's frozen BN `<name>/bn` on the output of layer `name`, in place, and its ReLU."""
        bn = self.layer(f"{name}/bn", "BN", [name], name, params).bn_param
        bn.slope_filler.type = "constant"
        bn.slope_filler.value = BN_SLOPE_FILL
        bn.bias_filler.type = "constant"
        bn.bias_filler.value = BN_BIAS_FILL
        bn.frozen = True
        bn.momentum = models.BN_MOMENTUM
        if relu:
            self.layer(f"{name}/relu", "ReLU", [name], name)

    def conv_bn(self, name, bottom, outputs, kernel, relu=True, **convolution):
        """Convolution `name` and its BN (and ReLU), as every convolution but conv6 is."""
        self.convolution(name, bottom, outputs, kernel, **convolution)
        self.batch_norm(name, relu=relu)

    def stem(self):
        """conv1_1..conv1_3 and pool1: the deep stem. Returns its top blob."""
        bottom = INPUT_BLOB
        for name, outputs, stride in STEM_CONVOLUTIONS:
            self.conv_bn(name, bottom, outputs, 3, stride=stride, pad=1)
            bottom = name
        pool = self.layer(STEM_POOL, "Pooling", [bottom]).pooling_param
        pool.pool = "MAX"
        pool.kernel_size = STEM_POOL_KERNEL
        pool.stride = STEM_POOL_STRIDE
        pool.pad = STEM_POOL_PAD
        return STEM_POOL

    def bottleneck(self, name, bottom, width, stride, dilation, project):
        """Residual block `name` (e.g. conv3_1): 1x1 reduce, 3x3, 1x1 increase, the projected
        shortcut of a stage's first block (`project`), the sum and its ReLU. Returns its top.

        A strided block strides its 1x1 reduce in ResNet-50 and its 3x3 in ResNet-101,
        as layers_builder.bottleneck does.
        """
        on_3x3 = self.config.depth in STRIDED_3X3_DEPTHS
        reduce_stride, middle_stride = (1, stride) if on_3x3 else (stride, 1)
        reduce, middle, increase = f"{name}_1x1_reduce", f"{name}_3x3", f"{name}_1x1_increase"
        self.conv_bn(reduce, bottom, width, 1, stride=reduce_stride, pad=0)
        self.conv_bn(middle, reduce, width, 3, stride=middle_stride, pad=dilation, dilation=dilation)
        self.conv_bn(increase, middle, BOTTLENECK_EXPANSION * width, 1, relu=False, pad=0)
        shortcut = bottom
        if project:
            shortcut = f"{name}_1x1_proj"
            self.conv_bn(shortcut, bottom, BOTTLENECK_EXPANSION * width, 1, relu=False, stride=stride, pad=0)
        self.layer(name, "Eltwise", [shortcut, increase]).eltwise_param.operation = "SUM"
        self.layer(f"{name}/relu", "ReLU", [name], name)
        return name

    def residual_stages(self, bottom):
        """Stages conv2..conv5 of the dilated ResNet (output stride 8). Returns the last block's top."""
        stages = zip(models.BLOCKS_PER_STAGE[self.config.depth], models.STAGE_WIDTHS, models.STAGE_DILATIONS)
        for stage, (blocks, width, dilation) in enumerate(stages, start=FIRST_STAGE):
            for block in range(1, blocks + 1):
                stride = 2 if stage == DOWNSAMPLING_STAGE and block == 1 else 1
                bottom = self.bottleneck(f"conv{stage}_{block}", bottom, width, stride, dilation, project=block == 1)
        return bottom

    def pyramid(self, bottom):
        """The pyramid pooling module on `bottom` (conv5_3). Returns the concatenation's blob.

        Each branch, from the fewest bins up, is average-pooled into bins x bins,
        convolved, and interpolated back to the map's side; the concatenation takes
        `bottom` and the branches in PYRAMID_BINS order.
        """
        side = models.feature_size(self.config.crop_size)
        for bins in sorted(models.PYRAMID_BINS):
            name = f"{bottom}_pool{bins}"
            pool = self.layer(name, "Pooling", [bottom]).pooling_param
            pool.pool = "AVE"
            pool.kernel_size = side // bins
            pool.stride = side // bins
            self.convolution(f"{name}_conv", name, models.PYRAMID_CHANNELS, 1, params=HEAD_CONVOLUTION_PARAMS)
            self.batch_norm(f"{name}_conv", params=HEAD_BN_PARAMS)
            interp = self.layer(f"{name}_interp", "Interp", [f"{name}_conv"]).interp_param
            interp.height = side
            interp.width = side
        branches = [f"{bottom}_pool{bins}_interp" for bins in models.PYRAMID_BINS]
        self.layer(f"{bottom}_concat", "Concat", [bottom] + branches)
        return f"{bottom}_concat"

    def head(self, bottom):
        """conv5_4 with its BN, ReLU and dropout, the conv6 classifier and its upsampling to the input size."""
        self.convolution("conv5_4", bottom, models.HEAD_CHANNELS, 3, pad=1, params=HEAD_CONVOLUTION_PARAMS)
        self.batch_norm("conv5_4", params=PARAMS_OF_LAYER.get((self.config.name, "conv5_4/bn"), HEAD_BN_PARAMS))
        dropout = self.layer("conv5_4/dropout", "Dropout", ["conv5_4"], "conv5_4").dropout_param
        dropout.dropout_ratio = models.DROPOUT_RATE
        classifier = self.layer("conv6", "Convolution", ["conv5_4"], params=CLASSIFIER_PARAMS).convolution_param
        classifier.num_output = self.config.classes
        classifier.kernel_size.append(1)
        classifier.stride.append(1)
        classifier.weight_filler.type = WEIGHT_FILLER
        self.layer("conv6_interp", "Interp", ["conv6"]).interp_param.zoom_factor = models.OUTPUT_STRIDE

    def build(self):
        """The whole net: stem, residual stages, pyramid and head."""
        self.head(self.pyramid(self.residual_stages(self.stem())))
        return self.net


def deploy_net(model):
    """The NetParameter of the deploy net of `model` (a models.ModelConfig or a released model's name).

    For a released model it is the net of the release's prototxt: the same layers in
    the same order, with the same names, bottoms, tops and parameters.
    """
    return DeployNet(models.model_config(model)).build()


def deploy_prototxt(model):
    """The deploy prototxt text of `model` (see deploy_net)."""
    return text_format.MessageToString(deploy_net(model))
