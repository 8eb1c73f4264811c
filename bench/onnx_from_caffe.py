"""An ONNX graph of a Caffe PSPNet deploy net, built from its prototxt and given weights.

This is the peer network the benchmark runs in ONNX Runtime: it is not an export of
this project's Keras model but an independent translation of the Caffe release's
deploy prototxt, layer by layer, into ONNX operators:

- Convolution -> Conv (symmetric pads, strides, dilations; bias only where Caffe has one)
- BN (the frozen BN of the release's Caffe fork, hszhao/PSPNet src/caffe/layers/bn_layer.cpp) -> BatchNormalization, epsilon 1e-5
- ReLU -> Relu; Eltwise SUM -> Add; Concat -> Concat on channels; Dropout -> identity
- Pooling MAX / AVE -> MaxPool / AveragePool with Caffe's ceil-mode output size
- Interp (the release's src/caffe/layers/interp_layer.cpp) -> Resize, mode linear, coordinate_transformation_mode align_corners

The prototxt is read with caffe_net's parser (protobuf). Weights are given as
{Caffe layer name: [float32 blobs in Caffe shapes]} (bench/synthetic_caffe.py's
`synthetic_weights` layout). The graph takes (1, 3, H, W) BGR mean-subtracted input
and returns the deploy net's (1, classes, H, W) logits.
"""

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from pspnet_keras import caffe_net

OPSET = 17
IR_VERSION = 8
BN_EPSILON = 1e-5
INPUT_NAME = "data"
POOL_METHODS = {number: name for name, number in caffe_net.ENUMS["PoolingParameter"]["PoolMethod"].items()}
ELTWISE_SUM = caffe_net.ENUMS["EltwiseParameter"]["EltwiseOp"]["SUM"]


class OnnxNet(NamedTuple):
    """An ONNX model of a deploy net with what the benchmark reports about it."""

    model: onnx.ModelProto
    input_name: str
    output_name: str
    input_shape: tuple
    conv_flops: int


class Blob(NamedTuple):
    """The ONNX tensor currently holding a Caffe blob, and its (channels, height, width)."""

    tensor: str
    channels: int
    height: int
    width: int


def conv_output_size(size, kernel, stride, pad, dilation):
    """Caffe's convolution output size along one axis."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size, kernel, stride, pad):
    """Caffe's ceil-mode pooling output size along one axis (last window starting inside)."""
    out = math.ceil((size + 2 * pad - kernel) / stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def interp_output_size(layer, size, where):
    """The output size of a Caffe Interp layer along one axis (height/width or zoom_factor)."""
    interp_param = layer.interp_param
    if interp_param.HasField("height") and interp_param.HasField("width"):
        return interp_param.height, interp_param.width
    if interp_param.HasField("zoom_factor"):
        zoom = interp_param.zoom_factor
        return tuple(length + (length - 1) * (zoom - 1) for length in size)
    raise ValueError(f"{where}: Interp without height/width or zoom_factor is not supported")


class GraphBuilder:
    """Accumulates ONNX nodes and initializers while the prototxt is walked."""

    def __init__(self, weights):
        self.weights = weights
        self.nodes = []
        self.initializers = []
        self.conv_flops = 0

    def constant(self, name, array):
        """Adds an initializer named `name`; returns the name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def convolution(self, layer, name, blob, top):
        """A Caffe Convolution as an ONNX Conv."""
        conv_param = layer.convolution_param
        (kernel,) = conv_param.kernel_size
        stride = conv_param.stride[0] if conv_param.stride else 1
        pad = conv_param.pad[0] if conv_param.pad else 0
        dilation = conv_param.dilation[0] if conv_param.dilation else 1
        blobs = self.weights[name]
        inputs = [blob.tensor, self.constant(f"{name}/weight", blobs[0])]
        if len(blobs) > 1:
            inputs.append(self.constant(f"{name}/bias", blobs[1].reshape(-1)))
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [top],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
                dilations=[dilation, dilation],
            )
        )
        out_channels = blobs[0].shape[0]
        height = conv_output_size(blob.height, kernel, stride, pad, dilation)
        width = conv_output_size(blob.width, kernel, stride, pad, dilation)
        self.conv_flops += 2 * out_channels * blob.channels * kernel * kernel * height * width
        return Blob(top, out_channels, height, width)

    def batch_norm(self, name, blob, top):
        """The fork's frozen BN (slope, bias, mean, variance) as an ONNX BatchNormalization."""
        slope, bias, mean, variance = (array.reshape(-1) for array in self.weights[name])
        inputs = [blob.tensor] + [
            self.constant(f"{name}/{role}", array)
            for role, array in zip(("scale", "bias", "mean", "variance"), (slope, bias, mean, variance))
        ]
        self.nodes.append(helper.make_node("BatchNormalization", inputs, [top], name=name, epsilon=BN_EPSILON))
        return blob._replace(tensor=top)

    def pooling(self, layer, name, blob, top, where):
        """A Caffe Pooling (MAX or AVE) as MaxPool / AveragePool with ceil-mode output."""
        pooling_param = layer.pooling_param
        method = POOL_METHODS[pooling_param.pool]
        kernel, stride, pad = pooling_param.kernel_size, pooling_param.stride, pooling_param.pad
        operator = {"MAX": "MaxPool", "AVE": "AveragePool"}.get(method)
        if operator is None:
            raise ValueError(f"{where}: pooling method {method} is not supported")
        self.nodes.append(
            helper.make_node(
                operator,
                [blob.tensor],
                [top],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
                ceil_mode=1,
            )
        )
        height = pool_output_size(blob.height, kernel, stride, pad)
        width = pool_output_size(blob.width, kernel, stride, pad)
        return Blob(top, blob.channels, height, width)

    def interp(self, layer, name, blob, top, where):
        """A Caffe Interp as an align-corners bilinear ONNX Resize to the Interp's output size."""
        height, width = interp_output_size(layer, (blob.height, blob.width), where)
        sizes = self.constant(f"{name}/sizes", np.array([1, blob.channels, height, width], dtype=np.int64))
        self.nodes.append(
            helper.make_node(
                "Resize",
                [blob.tensor, "", "", sizes],
                [top],
                name=name,
                mode="linear",
                coordinate_transformation_mode="align_corners",
            )
        )
        return Blob(top, blob.channels, height, width)


def build_onnx_net(prototxt_path, weights):
    """The OnnxNet of the deploy prototxt at `prototxt_path` with `weights`.

    In-place Caffe layers (BN, ReLU, Dropout writing their bottom) become new ONNX
    tensors named after the layer, so the graph stays in SSA form.
    """
    net = caffe_net.parse_prototxt(Path(prototxt_path).read_text())
    batch, channels, height, width = net.input_dim
    (input_blob,) = net.input
    blobs = {input_blob: Blob(INPUT_NAME, channels, height, width)}
    graph = GraphBuilder(weights)
    last_top = input_blob
    for layer in net.layer:
        name = layer.name
        where = f"layer '{name}'"
        layer_type = layer.type
        bottoms = [blobs[bottom] for bottom in layer.bottom]
        (top_blob,) = layer.top
        top = f"{name}/out"
        if layer_type == "Convolution":
            result = graph.convolution(layer, name, bottoms[0], top)
        elif layer_type == "BN":
            result = graph.batch_norm(name, bottoms[0], top)
        elif layer_type == "ReLU":
            graph.nodes.append(helper.make_node("Relu", [bottoms[0].tensor], [top], name=name))
            result = bottoms[0]._replace(tensor=top)
        elif layer_type == "Eltwise":
            if layer.eltwise_param.operation != ELTWISE_SUM:
                raise ValueError(f"{where}: only Eltwise SUM is supported")
            graph.nodes.append(helper.make_node("Sum", [blob.tensor for blob in bottoms], [top], name=name))
            result = bottoms[0]._replace(tensor=top)
        elif layer_type == "Concat":
            graph.nodes.append(helper.make_node("Concat", [blob.tensor for blob in bottoms], [top], name=name, axis=1))
            result = bottoms[0]._replace(tensor=top, channels=sum(blob.channels for blob in bottoms))
        elif layer_type == "Pooling":
            result = graph.pooling(layer, name, bottoms[0], top, where)
        elif layer_type == "Interp":
            result = graph.interp(layer, name, bottoms[0], top, where)
        elif layer_type == "Dropout":
            result = bottoms[0]
        else:
            raise ValueError(f"{where}: layer type {layer_type} is not supported")
        blobs[top_blob] = result
        last_top = top_blob
    output = blobs[last_top]
    graph_proto = helper.make_graph(
        graph.nodes,
        Path(prototxt_path).stem,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, channels, height, width])],
        [helper.make_tensor_value_info(output.tensor, TensorProto.FLOAT, [batch, output.channels, output.height, output.width])],
        initializer=graph.initializers,
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench/onnx_from_caffe")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return OnnxNet(model, INPUT_NAME, output.tensor, (batch, channels, height, width), graph.conv_flops)
