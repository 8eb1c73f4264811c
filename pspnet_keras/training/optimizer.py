"""The recipe's optimiser: SGD with momentum 0.9 and L2 weight decay as Caffe's SGDSolver
computes them, the "poly" learning rate policy, the new layers at 10x (paper §4;
hszhao/semseg tool/train.py).
"""

from pspnet_keras import runtime

tf = runtime.import_tensorflow()  # before Keras: TensorFlow starts as the commands start it

import keras

from pspnet_keras.training.network import is_head_layer
from pspnet_keras.training.recipe import BASE_LR
from pspnet_keras.training.recipe import HEAD_LR_MULTIPLIER
from pspnet_keras.training.recipe import MOMENTUM
from pspnet_keras.training.recipe import POLY_POWER
from pspnet_keras.training.recipe import WEIGHT_DECAY


@keras.saving.register_keras_serializable(package="pspnet")
class PolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Caffe's "poly" learning rate policy: base_lr * (1 - iteration / iterations) ^ power.

    Computed in double precision, as Caffe's SGDSolver::GetLearningRate does, and
    returned as float32.
    """

    def __init__(self, base_lr, iterations, power=POLY_POWER):
        self.base_lr = base_lr
        self.iterations = iterations
        self.power = power

    def __call__(self, step):
        progress = tf.minimum(tf.cast(step, tf.float64) / self.iterations, 1.0)
        return tf.cast(self.base_lr * (1.0 - progress) ** self.power, tf.float32)

    def get_config(self):
        return {"base_lr": self.base_lr, "iterations": self.iterations, "power": self.power}


@keras.saving.register_keras_serializable(package="pspnet")
class CaffeSGD(keras.optimizers.SGD):
    """SGD as Caffe's SGDSolver computes it, with per-layer learning rate multipliers.

    For a variable w with gradient g, learning rate lr and multiplier m:
        g' = m * (g + weight_decay * w)         (Regularize, L2: the decay is in the gradient)
        v  = momentum * v - lr * g'             (ComputeUpdateValue, with lr_mult = m)
        w  = w + v
    Keras' own `weight_decay` argument is decoupled instead (w -= lr * wd * w after
    the update, not through the momentum nor the multiplier), which is left unset.
    `lr_multipliers` maps variable paths (keras.Variable.path) to multipliers, 1 for
    the others.
    """

    def __init__(self, learning_rate=BASE_LR, momentum=MOMENTUM, l2_decay=WEIGHT_DECAY, lr_multipliers=None, **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.l2_decay = l2_decay
        self.lr_multipliers = dict(lr_multipliers or {})

    def build(self, variables):
        super().build(variables)
        self.multipliers = [float(self.lr_multipliers.get(variable.path, 1.0)) for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self.multipliers[self._get_variable_index(variable)]
        gradient = tf.cast(gradient, variable.dtype) + tf.cast(self.l2_decay, variable.dtype) * variable
        super().update_step(gradient * tf.cast(multiplier, variable.dtype), variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.update(l2_decay=self.l2_decay, lr_multipliers=self.lr_multipliers)
        return config


def head_lr_multipliers(model, multiplier=HEAD_LR_MULTIPLIER):
    """{variable path: multiplier} for the variables of the head layers of `model` (is_head_layer)."""
    return {
        variable.path: multiplier for layer in model.layers if is_head_layer(layer.name) for variable in layer.weights
    }


def recipe_optimizer(
    model,
    iterations,
    base_lr=BASE_LR,
    momentum=MOMENTUM,
    weight_decay=WEIGHT_DECAY,
    power=POLY_POWER,
    head_lr_multiplier=HEAD_LR_MULTIPLIER,
    precision="float32",
):
    """The recipe's optimiser for `model`, with the poly schedule over `iterations`.

    float16 training wraps it in Keras' dynamic loss scaling (LossScaleOptimizer),
    which skips the steps whose scaled gradients overflow.
    """
    optimizer = CaffeSGD(
        learning_rate=PolyDecay(base_lr, iterations, power),
        momentum=momentum,
        l2_decay=weight_decay,
        lr_multipliers=head_lr_multipliers(model, head_lr_multiplier),
    )
    if precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
