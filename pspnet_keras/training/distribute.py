"""Where a training run's replicas are: TF_CONFIG's cluster of workers and the GPUs of this machine.

TensorFlow's distributed training guide ("Multi-worker training with Keras"): every worker
of a cluster runs the same program with its own `task` in TF_CONFIG, the chief (or worker 0)
writes the files, and MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
"""

import json
import os

from pspnet_keras import cli
from pspnet_keras import runtime


def cluster_spec():
    """The TF_CONFIG of this process as a dict ({} when unset); cli.CommandError when it is not a JSON object."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError as error:
        raise cli.CommandError(f"TF_CONFIG is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise cli.CommandError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    return config


def worker_count(config):
    """The number of workers (chief included) of a TF_CONFIG."""
    cluster = config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def is_chief(config):
    """Whether this process writes the run's files: the chief, or worker 0 of a cluster without one."""
    if worker_count(config) <= 1:
        return True
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def distribution_strategy():
    """The tf.distribute strategy of this process.

    MultiWorkerMirroredStrategy when TF_CONFIG describes several workers (made
    before TensorFlow runs anything, as it must be), MirroredStrategy over the GPUs
    when there are several, else the default strategy.
    """
    tf = runtime.import_tensorflow()
    if worker_count(cluster_spec()) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
