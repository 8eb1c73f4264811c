"""The recipe's loss: softmax cross-entropy of the main output plus 0.4 times that of the
auxiliary classifier (paper §3.4 and §5.1), unlabelled pixels (255) left out of sums and means.
"""

from pspnet_keras import runtime

tf = runtime.import_tensorflow()

from pspnet_keras.datasets import IGNORE_LABEL
from pspnet_keras.training.recipe import AUX_WEIGHT


def pixel_loss_sum(labels, logits):
    """(sum of the softmax cross-entropy over the labelled pixels, number of labelled pixels).

    `labels` (B, H, W) class ids with IGNORE_LABEL where unlabelled; `logits` (B, H, W, classes).
    """
    labels = tf.cast(labels, tf.int32)
    labelled = tf.not_equal(labels, IGNORE_LABEL)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.where(labelled, labels, 0), tf.cast(logits, tf.float32)
    )
    return tf.reduce_sum(tf.where(labelled, cross_entropy, 0.0)), tf.reduce_sum(tf.cast(labelled, tf.float32))


def replica_sum(value):
    """`value` summed over the replicas of the distribution strategy in whose step this runs."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def segmentation_losses(labels, logits, aux_logits, aux_weight=AUX_WEIGHT):
    """The recipe's loss of one step: {"loss", "main_loss", "aux_loss"}.

    Each is the mean cross-entropy over the labelled pixels of the whole (global)
    batch, as Caffe's SoftmaxWithLoss with ignore_label 255 and normalization VALID
    and torch's CrossEntropyLoss(ignore_index=255) compute it; "loss" is
    main_loss + aux_weight * aux_loss. Under a distribution strategy each replica
    returns its share (its pixels' sum over the global count) in "loss", whose
    gradients the optimiser sums over replicas, and the global values of the two
    parts for logging.
    """
    main_sum, labelled = pixel_loss_sum(labels, logits)
    aux_sum, _ = pixel_loss_sum(labels, aux_logits)
    labelled = tf.stop_gradient(tf.maximum(replica_sum(labelled), 1.0))
    loss = (main_sum + aux_weight * aux_sum) / labelled
    return {
        "loss": loss,
        "main_loss": replica_sum(main_sum) / labelled,
        "aux_loss": replica_sum(aux_sum) / labelled,
    }
