"""Where a training run's replicas are: TF_CONFIG's cluster of workers and the GPUs of this machine.

TensorFlow's distributed training guide ("Multi-worker training with Keras"): every worker
of a cluster runs the same program with its own `task` in TF_CONFIG, the chief (or worker 0)
writes the files, and MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
TF_CONFIG is checked field by field first, so that a wrong one is one line naming the field
instead of a TensorFlow error or a worker waiting for peers that are not there.
"""

import json
import os

from pspnet_keras import cli
from pspnet_keras import runtime

VARIABLE = "TF_CONFIG"
# The task types of a MultiWorkerMirroredStrategy cluster ("Multi-worker training with Keras":
# a chief, optional, and workers); parameter servers and evaluators take no part in it.
TASK_TYPES = ("chief", "worker")


class ClusterError(cli.CommandError):
    """A TF_CONFIG that is not a cluster this program can run in; the message names the field."""

    def __init__(self, field, problem):
        super().__init__(f"{VARIABLE}: field '{field}' {problem}")


def address_problem(address):
    """Why a cluster entry is not a "host:port" address, or None."""
    if not isinstance(address, str):
        return f"must be a \"host:port\" string, not {cli.shown_value(address)}"
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"must be \"host:port\" with a port 1-65535, not {cli.shown_value(address)}"
    return None


def check_cluster(cluster):
    """Refuses a `cluster` that is not {task type: ["host:port", ...]} of TASK_TYPES, one chief at most,
    every address once."""
    if not isinstance(cluster, dict) or not cluster:
        raise ClusterError(
            "cluster", f"must be an object of task types and their \"host:port\" lists, not {cli.shown_value(cluster)}"
        )
    seen = set()
    for task_type, addresses in cluster.items():
        field = f"cluster.{task_type}"
        if task_type not in TASK_TYPES:
            raise ClusterError(field, f"is not a task type train.py runs ({' or '.join(TASK_TYPES)})")
        if not isinstance(addresses, list) or not addresses:
            raise ClusterError(field, f"must be a non-empty list of \"host:port\" strings, not {cli.shown_value(addresses)}")
        if task_type == "chief" and len(addresses) > 1:
            raise ClusterError(field, f"must list one address (a cluster has one chief), not {len(addresses)}")
        for index, address in enumerate(addresses):
            problem = address_problem(address)
            if problem:
                raise ClusterError(f"{field}[{index}]", problem)
            if address in seen:
                raise ClusterError(f"{field}[{index}]", f"repeats {cli.shown_value(address)}; each task needs its own address")
            seen.add(address)


def check_task(task, cluster):
    """Refuses a `task` that is not {"type": a task type of `cluster`, "index": its place in that list}."""
    if not isinstance(task, dict):
        raise ClusterError("task", f"must be an object {{\"type\": ..., \"index\": ...}}, not {cli.shown_value(task)}")
    task_type = task.get("type")
    if task_type not in cluster:
        raise ClusterError(
            "task.type", f"must be one of the cluster's task types ({', '.join(cluster)}), not {cli.shown_value(task_type)}"
        )
    index = task.get("index")
    last = len(cluster[task_type]) - 1
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= last:
        raise ClusterError(
            "task.index", f"must be an integer 0..{last} (cluster.{task_type} lists {last + 1}), not {cli.shown_value(index)}"
        )


def cluster_spec():
    """The TF_CONFIG of this process as a dict ({} when unset or {}), checked: a cluster of TASK_TYPES
    and this process's task in it. ClusterError (a cli.CommandError) names the wrong field."""
    text = os.environ.get(VARIABLE)
    if not text:
        return {}
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise cli.CommandError(f"{VARIABLE}: not valid JSON ({str(error)[:80]})") from None
    if not isinstance(config, dict):
        raise cli.CommandError(f"{VARIABLE}: must be a JSON object with 'cluster' and 'task', not {cli.shown_value(config)}")
    if not config:
        return {}
    if "cluster" not in config:
        raise ClusterError("cluster", "is missing")
    check_cluster(config["cluster"])
    if "task" not in config:
        raise ClusterError("task", "is missing (this process's place in the cluster)")
    check_task(config["task"], config["cluster"])
    return config


def worker_count(config):
    """The number of workers (chief included) of a checked TF_CONFIG (cluster_spec)."""
    cluster = config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in TASK_TYPES)


def is_chief(config):
    """Whether this process writes the run's files: the chief, or worker 0 of a cluster without one."""
    if worker_count(config) <= 1:
        return True
    task = config["task"]
    if "chief" in config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def distribution_strategy(config):
    """The tf.distribute strategy of this process, for its checked TF_CONFIG `config` (cluster_spec).

    MultiWorkerMirroredStrategy when TF_CONFIG describes several workers (made
    before TensorFlow runs anything, as it must be), MirroredStrategy over the GPUs
    when there are several, else the default strategy.
    """
    tf = runtime.import_tensorflow()
    if worker_count(config) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
