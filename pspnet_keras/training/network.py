"""The training network: PSPNet with the auxiliary classifier on stage 4 (paper §3.4;
hszhao/semseg model/pspnet.py), per-sample dropout, and the recipe's training step.
"""

from pspnet_keras import runtime

tf = runtime.import_tensorflow()  # before Keras: TensorFlow starts as the commands start it

import keras
from keras import layers

import layers_builder
from layers_builder import Interp
from pspnet_keras import models
from pspnet_keras.runtime import PRECISION_POLICIES
from pspnet_keras.training.loss import segmentation_losses
from pspnet_keras.training.recipe import AUX_WEIGHT

# Auxiliary head (hszhao/semseg model/pspnet.py, `self.aux`): 3x3 conv 256, BN, ReLU,
# dropout 0.1, 1x1 conv to the classes, upsampled as the main head.
AUX_PREFIX = "aux"
AUX_CHANNELS = 256
AUX_DROPOUT_RATE = 0.1
# Layers trained at HEAD_LR_MULTIPLIER x the learning rate (hszhao/semseg tool/train.py,
# `modules_new`: the pyramid module, the classifier and the auxiliary head).
HEAD_LAYER_PREFIXES = ("conv5_3_pool", "conv5_4", "conv6", AUX_PREFIX)


class SampleDropout(layers.Layer):
    """Dropout (inverted, as Keras' and Caffe's) whose mask is drawn from each sample's own seed.

    Takes [features, seeds], seeds (B, 2) int64 stateless seeds; `salt` tells the
    layers of one network apart. The masks, like every other random draw of a step,
    depend only on the samples, not on how the batch is split over replicas.
    """

    def __init__(self, rate, salt, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.salt = salt

    def call(self, inputs, training=None):
        features, seeds = inputs
        if not training:
            return features
        shape = tf.shape(features)[1:]

        def keep(seed):
            salted = tf.random.experimental.stateless_split(seed, self.salt + 1)[self.salt]
            return tf.random.stateless_uniform(shape, salted) >= self.rate

        mask = tf.map_fn(keep, seeds, fn_output_signature=tf.TensorSpec(None, tf.bool))
        return tf.where(mask, features / tf.cast(1.0 - self.rate, features.dtype), tf.zeros_like(features))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, salt=self.salt)
        return config


def auxiliary_head(x, seeds, classes):
    """The training-only classifier on stage 4's output: 3x3 conv 256 + BN + ReLU, dropout 0.1,
    1x1 conv to the classes, x8 align-corners Interp (as conv6_interp)."""
    x = layers_builder.conv_bn(x, AUX_CHANNELS, 3, f"{AUX_PREFIX}_3x3", layers_builder.StartingWeights())
    x = SampleDropout(AUX_DROPOUT_RATE, salt=1, name=f"{AUX_PREFIX}_dropout")([x, seeds])
    x = layers.Conv2D(classes, 1, name=f"{AUX_PREFIX}_conv6")(x)
    return Interp(zoom_factor=models.OUTPUT_STRIDE, name=f"{AUX_PREFIX}_interp")(x)


class TrainingModel(keras.Model):
    """PSPNet with the auxiliary head; `fit` minimises the recipe's loss (segmentation_losses).

    Inputs [image batch (B, S, S, 3), dropout seeds (B, 2) int64]; outputs the main
    and the auxiliary logits (B, S, S, classes). A training step takes batches of
    (images, labels) or ((images, seeds), labels); without seeds, they are drawn
    from the model's own seed generator.
    """

    def __init__(self, *args, aux_weight=AUX_WEIGHT, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_weight = aux_weight
        self.dropout_seeds = keras.random.SeedGenerator(0, name="dropout_seeds")

    def train_step(self, data):
        inputs, labels = data
        if isinstance(inputs, (tuple, list)):
            images, seeds = inputs
        else:
            images = inputs
            seeds = keras.random.randint((tf.shape(images)[0], 2), 0, 2**31 - 1, seed=self.dropout_seeds, dtype="int64")
        with tf.GradientTape() as tape:
            logits, aux_logits = self([images, seeds], training=True)
            losses = segmentation_losses(labels, logits, aux_logits, self.aux_weight)
            scaled = self.optimizer.scale_loss(losses["loss"])
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        losses["loss"] = losses["main_loss"] + self.aux_weight * losses["aux_loss"]
        return losses


def stage4_output(network, depth):
    """The output of the last block of stage 4 (conv4_6 of ResNet-50, conv4_23 of ResNet-101)."""
    blocks = models.BLOCKS_PER_STAGE[depth][2]
    return network.get_layer(f"conv4_{blocks}_relu").output


def build_training_model(config, crop_size=None, train_bn=False, precision="float32", aux_weight=AUX_WEIGHT):
    """(training model, inference network) of a models.ModelConfig at `crop_size` (default its crop).

    The inference network is layers_builder.build_pspnet's; the training model
    shares its layers, adds the auxiliary head on stage 4's output and draws the
    dropout of conv5_4 per sample (SampleDropout). BN layers are set by
    set_batch_norm_training.
    """
    network = layers_builder.build_pspnet(config, crop_size, precision)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISION_POLICIES[precision])
    try:
        seeds = keras.Input((2,), dtype="int64", name="dropout_seeds")
        x = network.get_layer("conv5_4_relu").output
        x = SampleDropout(models.DROPOUT_RATE, salt=0, name="conv5_4_sample_dropout")([x, seeds])
        x = network.get_layer("conv6")(x)
        logits = network.get_layer("conv6_interp")(x)
        aux_logits = auxiliary_head(stage4_output(network, config.depth), seeds, config.classes)
    finally:
        keras.config.set_dtype_policy(policy)
    model = TrainingModel(
        [network.input, seeds], [logits, aux_logits], aux_weight=aux_weight, name=f"{network.name}_training"
    )
    set_batch_norm_training(model, train_bn)
    return model, network


def set_batch_norm_training(model, train_bn):
    """Freezes or trains the BN layers of a training model.

    Frozen (the default): a BN layer normalises with its stored statistics and its
    scale and offset (gamma, beta) stay as loaded; it is a fixed per-channel affine
    map, as Keras makes a BatchNormalization with trainable=False. The auxiliary
    head's BN, which has no stored statistics, always normalises with batch
    statistics. Trained (`train_bn`): every BN normalises with the statistics of
    the global batch, synchronised across replicas (synchronized=True), updates its
    moving averages and trains gamma and beta.
    """
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            trains = train_bn or layer.name.startswith(AUX_PREFIX)
            layer.trainable = trains
            layer.synchronized = trains


def is_head_layer(name):
    """Whether the layer `name` is one of the new layers trained at the head learning rate."""
    return name.startswith(HEAD_LAYER_PREFIXES)
