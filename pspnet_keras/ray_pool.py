"""pspnet.py and evaluate.py on Ray: the images shared out to a pool of workers, each holding one model.

    python pspnet.py -g 'photos/*.jpg' -o results/ --ray                    # embedded Ray, this machine
    python pspnet.py -g '/shared/photos/*.jpg' -o /shared/out --ray auto    # the cluster of `ray start`
    python evaluate.py -m pspnet50_ade20k --data /shared/ADE -s --ray auto

The images are a Ray Data dataset of file paths, one block per image, mapped by an
actor pool (Ray Data, "Stateful Transforms": `map` with a callable class and an
ActorPoolStrategy). Each actor loads the model once and runs, for each image, what
the single-process commands run: segment.segment, which writes the image's outputs
itself, all or none, and scoring.measure_sample, whose confusion matrix it sends
back for the driver to add up. The driver reads no image.

Faults: Ray Data creates its actors with max_restarts=-1 and max_task_retries=-1
(ActorPoolMapOperator's defaults; Ray Core, "Actor Fault Tolerance"): when a worker
process dies, Ray starts it again and resubmits the images it had not finished, at
least once each. Each image's attempts are counted in one small actor of the run
(`Attempts`): an image taken up again after its worker died is said in one line, and
one whose worker died on each of MAX_ATTEMPTS attempts is reported as failed instead
of being run again, so that an image that kills every worker ends the run. A worker
killed while writing leaves only its temporary files, never a half-written output;
the driver removes them when the run ends. Every result names its image, so an image
run twice counts once.

Ray is imported only here, and this module only with --ray.
"""

import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

import numpy as np
from tqdm import tqdm

import utils
from pspnet_keras import cli
from pspnet_keras import datasets
from pspnet_keras import runtime
from pspnet_keras import scoring
from pspnet_keras import segment
from pspnet_keras.segmenter import load_network

PROJECT_DIR = Path(__file__).resolve().parents[1]
INSTALL_COMMAND = "python -m pip install -r requirements-ray.txt"
# A CPU worker's cores when --workers does not say, its TensorFlow threads: each worker holds a
# model and its activations, up to 4.1 GiB (bench/README.md, "On Ray").
CORES_PER_CPU_WORKER = 4
# Images sent to an actor ahead of the one it runs, so that it never waits for the driver
# (ActorPoolStrategy's max_tasks_in_flight_per_actor).
TASKS_IN_FLIGHT_PER_WORKER = 2
# The scheme of a Ray Client address (ray://HOST:PORT, Ray's "Ray Client" docs).
RAY_CLIENT_SCHEME = "ray://"
# Seconds to wait for the head of a cluster to answer at HOST:PORT.
CONNECT_TIMEOUT_S = 10
# Attempts at an image whose worker died each time before it is reported as failed.
MAX_ATTEMPTS = 3
# JAX takes 75 % of a GPU's memory when it starts unless this says otherwise.
JAX_PREALLOCATE_VARIABLE = "XLA_PYTHON_CLIENT_PREALLOCATE"
# AtomicFiles' temporary file of a target: ".<target name>.<8 random characters>.tmp" (tempfile.mkstemp).
TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


class RunError(Exception):
    """A Ray run that cannot start or go on; the message is one line saying why."""


@dataclasses.dataclass(frozen=True)
class Pool:
    """The actor pool of a run: how many workers, each one's CPUs and GPUs, and why that many."""

    workers: int
    cpus: int
    gpus: float
    reason: str

    def description(self):
        """The pool in words: '2 workers of 1 CPU each', '4 workers of 8 CPUs and 1 GPU each'."""
        resources = f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"
        if self.gpus:
            resources += f" and {self.gpus:g} GPU{'s' if self.gpus != 1 else ''}"
        each = " each" if self.workers > 1 else ""
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} of {resources}{each}"


def import_ray():
    """The ray module with Ray Data; RunError naming the install command when Ray is not installed."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise RunError(f"--ray needs Ray ({error}); install it with: {INSTALL_COMMAND}") from None
    return ray


def gpu_slots(node, gpus):
    """How many workers of `gpus` GPUs the GPUs of a node ({"CPU": n, "GPU": m}) hold."""
    return math.floor(node.get("GPU", 0) / gpus + 1e-9)


def room_on(node, cpus, gpus):
    """How many workers of `cpus` CPUs and `gpus` GPUs fit on a node."""
    room = int(node.get("CPU", 0) // cpus)
    return min(room, gpu_slots(node, gpus)) if gpus else room


def worker_cpus(nodes, workers, gpus):
    """A worker's CPUs when the command line does not say: the CPUs beside each worker's GPUs
    on the tightest GPU node; else the cores --workers shares out, or CORES_PER_CPU_WORKER, at
    most the cores of the smallest node that has any."""
    if gpus:
        shares = [node.get("CPU", 0) // gpu_slots(node, gpus) for node in nodes if gpu_slots(node, gpus)]
        return max(1, int(min(shares, default=1)))
    cores = [int(node["CPU"]) for node in nodes if node.get("CPU", 0) >= 1] or [1]
    wanted = sum(cores) // workers if workers else CORES_PER_CPU_WORKER
    return max(1, min(min(cores), wanted))


def plan_pool(nodes, workers=None, gpus_per_worker=None, cpus_per_worker=None):
    """The Pool for a cluster of `nodes` (the resources of each alive node) and the command line's
    --workers, --gpus-per-worker and --cpus-per-worker (None where not given).

    Without --workers: one worker per GPU (per --gpus-per-worker GPUs) where the cluster has
    GPUs, else one CPU worker per CORES_PER_CPU_WORKER cores of each node.
    """
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    gpus = gpus_per_worker if gpus_per_worker is not None else (1 if total_gpus else 0)
    if gpus and not total_gpus:
        raise RunError(f"--gpus-per-worker {gpus:g}: the Ray cluster has no GPU (0 makes CPU workers)")
    cpus = cpus_per_worker or worker_cpus(nodes, workers, gpus)
    room = sum(room_on(node, cpus, gpus) for node in nodes)
    per_cores = "one per core" if cpus == 1 else f"one per {cpus} cores"
    if workers:
        reason = "as --workers says"
    elif gpus:
        reason = "one per GPU" if gpus == 1 else f"{1 / gpus:.3g} per GPU" if gpus < 1 else f"one per {gpus:g} GPUs"
    elif total_gpus:
        reason = f"CPU workers as --gpus-per-worker 0 says, {per_cores}"
    else:
        reason = f"no GPU: {per_cores}"
    return Pool(workers or max(room, 1), cpus, gpus, reason), room


def quiet_ray_logging(verbose):
    """Keeps Ray's Python log lines below errors off the console, unless verbose."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)


def worker_environment():
    """The runtime environment of the workers: this project on their module path (the same
    clone at the same path on every machine), and the command's Keras backend."""
    return {
        "env_vars": {
            "PYTHONPATH": f"{PROJECT_DIR}{os.pathsep}${{PYTHONPATH}}",
            runtime.KERAS_BACKEND_VARIABLE: runtime.backend_name(),
        }
    }


def root_cause(error):
    """The first sentence of the innermost cause of `error`: why Ray could not connect."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().split(". ")[0].splitlines()[0]


def check_reachable(address):
    """RunError unless something listens at a HOST:PORT or ray://HOST:PORT address (ray.init retries a
    silent one for minutes, a Ray Client one for 30 s); 'auto' is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.removeprefix(RAY_CLIENT_SCHEME).rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    advice = "give HOST:PORT of its head (ray start --head) or 'auto' on one of its machines"
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise RunError(f"cannot join the Ray cluster at {address}: not HOST:PORT with a port 1-65535; {advice}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RunError(f"cannot join the Ray cluster at {address}: {error}; {advice}") from None


def ray_processes_below(pid):
    """The pids of the processes below `pid` (children, their children, ...) that run Ray: what an embedded
    ray.init starts (gcs_server, raylet, Ray's agents and workers). Read from /proc (proc(5)); empty elsewhere."""
    children = {}
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError), open(f"{entry.path}/stat") as stat:
                    children.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop()
        queue.extend(children.get(child, []))
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as cmdline:
            if b"ray" in cmdline.read():
                found.append(child)
    return found


def stop_ray_start_up(ray):
    """Stops what an interrupted ray.init started: ray.shutdown, then SIGKILL to whatever of it is left
    (Ray's dashboard and runtime-env agents outlive a raylet stopped before they registered)."""
    started = ray_processes_below(os.getpid())
    ray.shutdown()
    for pid in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def stop_ray_on_interruption(ray):
    """The exit callback of a Ray session this process started: ray.shutdown, and on Ctrl-C or SIGTERM
    also SIGKILL to the processes of it that are left (stop_ray_start_up)."""

    def stop(error_type, error, traceback):
        if error_type is not None and issubclass(error_type, KeyboardInterrupt):
            stop_ray_start_up(ray)
        else:
            ray.shutdown()
        return False

    return stop


def start_ray(ray, address, embedded, verbose):
    """Starts an embedded Ray or joins the cluster at `address`, keeping the caller's SIGTERM
    handling: ray.init installs its own, which exits with status 15 (sys.exit(SIGTERM)) without the
    commands' cleanup. SIGTERM or Ctrl-C while Ray starts stops what it started (ray.shutdown) and
    raises cli.Terminated or KeyboardInterrupt."""
    if not embedded:
        check_reachable(address)
    sigterm = signal.getsignal(signal.SIGTERM)
    options = {"num_cpus": runtime.usable_cores(), "include_dashboard": False} if embedded else {}
    try:
        ray.init(
            address=address, runtime_env=worker_environment(), log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR, **options,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RunError(f"cannot join the Ray cluster at {address}: {root_cause(error)}") from None
    except SystemExit as stop:
        if stop.code != signal.SIGTERM:
            raise
        stop_ray_start_up(ray)
        raise cli.Terminated() from None
    except KeyboardInterrupt:
        stop_ray_start_up(ray)
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


@contextlib.contextmanager
def ray_session(ray, address, verbose):
    """Ray for one run: the session this process already has (Python callers and tests), else an
    embedded Ray on this machine (address cli.RAY_LOCAL) or the cluster at `address` ('auto',
    HOST:PORT), left at the end. Ray's log lines and progress bars stay off the console unless verbose.

    Yields whether Ray is embedded and the resources of each alive node.
    """
    quiet_ray_logging(verbose)
    embedded = address == cli.RAY_LOCAL
    with contextlib.ExitStack() as stack:
        if not verbose:
            # Ray's C++ log lines on stderr (the driver's, such as the notice that Ray Data's actors
            # take their arguments from the object store) are not for the user of a command.
            stack.enter_context(runtime.native_stderr(python_to_console=True))
        if not ray.is_initialized():
            start_ray(ray, address, embedded, verbose)
            stack.push(stop_ray_on_interruption(ray))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = verbose
        context.print_on_execution_start = verbose
        yield embedded, [node["Resources"] for node in ray.nodes() if node["Alive"]]


def start_pool(prog, nodes, embedded, args, quiet):
    """The Pool of the command line for `nodes`, announced in one line unless quiet; RunError
    when an embedded Ray has no room for it (a cluster may grow: there it is a warning)."""
    pool, room = plan_pool(nodes, args.workers, args.gpus_per_worker, args.cpus_per_worker)
    where = "this machine" if embedded else f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    cores = sum(node.get("CPU", 0) for node in nodes)
    gpus = sum(node.get("GPU", 0) for node in nodes)
    found = f"{cores:g} cores, {f'{gpus:g} GPUs' if gpus else 'no GPU'}"
    if pool.workers > room:
        problem = f"{where} ({found}) has room for {room} of {pool.description()}"
        if embedded:
            raise RunError(f"{problem}; ask for fewer with --workers or less with --cpus-per-worker")
        tqdm.write(f"{prog}: warning: {problem}; waiting for the cluster to grow", file=sys.stderr)
    if not quiet:
        tqdm.write(
            f"{prog}: Ray on {where} ({found}): {pool.description()}, {pool.reason}; "
            f"Keras on {runtime.backend_name()}", file=sys.stderr,
        )
    return pool


def start_worker_process(pool):
    """Prepares an actor's process before its Keras backend starts: thread pools of the actor's CPUs,
    no GPU for a CPU actor (Ray gives a GPU actor its own in CUDA_VISIBLE_DEVICES), and GPU memory
    taken as needed rather than all at once (TensorFlow's memory growth, JAX's preallocation off:
    jax.readthedocs.io, "GPU memory allocation"), so that workers can share a GPU."""
    os.environ[runtime.INTRA_OP_VARIABLE] = str(pool.cpus)
    os.environ[runtime.INTER_OP_VARIABLE] = str(runtime.INTER_OP_THREADS)
    if not pool.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ[JAX_PREALLOCATE_VARIABLE] = "false"
    runtime.import_keras()
    if runtime.backend_name() == "tensorflow":
        tf = runtime.import_tensorflow()
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)


class Attempts:
    """The attempts at each image of a run (a Ray actor of no CPU, one per run): a worker starting on an
    image records itself there, so that a worker taking up an image after another died on it knows."""

    def __init__(self):
        self.workers = {}

    def start(self, key, worker):
        """Records that `worker` (its host and pid) starts on the image `key`; returns the workers that
        started on it before, in order (each of which died, since the image is being run again)."""
        earlier = self.workers.setdefault(key, [])
        before = list(earlier)
        earlier.append(worker)
        return before


def new_attempts(ray):
    """The Attempts actor of a run."""
    return ray.remote(num_cpus=0)(Attempts).remote()


def attempt_problems(ray, attempts, key, what):
    """(lines to print, failure or "") of a worker starting on the image `key` (`what` names it): a line
    for each worker that died on the image before (a worker that dies returns nothing, so the one that
    returns says it), and, after MAX_ATTEMPTS such deaths, the failure to report instead of running it."""
    died = ray.get(attempts.start.remote(key, f"{socket.gethostname()} pid {os.getpid()}"))
    lines = [
        f"warning: a worker ({worker}) died while on {what}, attempt {number} of {MAX_ATTEMPTS}: killed by a "
        "signal, out of memory (the kernel's or Ray's memory monitor) or a crash of its process"
        for number, worker in enumerate(died, start=1)
    ]
    failure = f"{what}: left out, its worker died on each of {MAX_ATTEMPTS} attempts" if len(died) >= MAX_ATTEMPTS else ""
    return lines, failure


def map_with_pool(ray, rows, worker, arguments, pool):
    """The results of `worker` (a callable class built with `arguments`) over `rows`, one image
    per block, on an actor pool of `pool`, as they come."""
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    results = dataset.map(
        worker,
        fn_constructor_kwargs=arguments,
        compute=ray.data.ActorPoolStrategy(
            size=pool.workers, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_WORKER
        ),
        num_cpus=pool.cpus,
        num_gpus=pool.gpus,
    )
    return results.iter_rows()


def remove_temporaries(targets):
    """Removes the temporary files that workers killed while writing left beside `targets`."""
    names = {}
    for target in map(Path, targets):
        names.setdefault(target.parent, set()).add(target.name)
    for folder, wanted in names.items():
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                match = TEMPORARY_NAME.fullmatch(entry.name)
                if match and match["target"] in wanted:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def consume(prog, results, total, quiet, handle):
    """Calls handle(result) on each result, once per image, under one progress bar; a worker's
    `fatal` problem (its model did not load) stops the run. Ray's own failures become RunError."""
    from ray.exceptions import RayError

    seen = set()
    try:
        with tqdm(total=total, unit="image", disable=quiet or total == 1) as bar:
            for result in results:
                if result["fatal"]:
                    raise RunError(result["fatal"])
                for line in result["warnings"]:
                    tqdm.write(f"{prog}: {line}", file=sys.stderr)
                if result["key"] in seen:
                    continue
                seen.add(result["key"])
                handle(result)
                bar.update(1)
    except RayError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"Ray stopped the run: {reason}") from None


class ImageWorker:
    """A Ray actor segmenting images as pspnet.py does: one network, each image's outputs written here."""

    def __init__(self, args, config, pool, attempts):
        start_worker_process(pool)
        self.attempts = attempts
        self.protocol = cli.protocol(args)
        self.verbose = args.verbose
        self.net, self.fatal = None, ""
        try:
            self.net = load_network(config, args.weights, show_progress=False, precision=args.precision)
        except cli.CommandError as error:
            self.fatal = str(error)

    def __call__(self, row):
        """Segments the image of `row` ({"key": source path, "outputs": {kind: path}}); returns the
        error or the summary lines pspnet.py prints."""
        result = {"key": row["key"], "fatal": self.fatal, "error": "", "summary": "", "warnings": []}
        if self.fatal:
            return result
        source = Path(row["key"])
        result["warnings"], result["error"] = attempt_problems(import_ray(), self.attempts, row["key"], str(source))
        if result["error"]:
            return result
        outputs = {kind: Path(path) for kind, path in row["outputs"].items()}
        try:
            class_ids = segment.segment(self.net, segment.read_input_image(source), source, outputs, self.protocol, quiet=True)
        except utils.ImageError as error:
            result["error"] = str(error)
            return result
        result["summary"] = "\n".join(segment.summary_lines(source, utils.class_summary(class_ids, self.net.class_names), self.verbose))
        return result


def segment_images(prog, args, config, plan):
    """pspnet.py's run over `plan` ({source: {kind: output path}}) on Ray; returns the exit code. `prog`
    names the command in the lines it prints."""
    ray = import_ray()
    rows = [{"key": str(source), "outputs": {kind: str(path) for kind, path in outputs.items()}}
            for source, outputs in plan.items()]
    failures = 0

    def report(result):
        nonlocal failures
        if result["error"]:
            tqdm.write(f"{prog}: error: {result['error']}", file=sys.stderr)
            failures += 1
        elif not args.quiet:
            tqdm.write(result["summary"], file=sys.stdout)

    try:
        with ray_session(ray, args.ray, args.verbose) as (embedded, nodes):
            pool = start_pool(prog, nodes, embedded, args, args.quiet)
            arguments = {"args": args, "config": config, "pool": pool, "attempts": new_attempts(ray)}
            results = map_with_pool(ray, rows, ImageWorker, arguments, pool)
            consume(prog, results, len(rows), args.quiet, report)
    finally:
        remove_temporaries(path for outputs in plan.values() for path in outputs.values())
    return cli.EXIT_FAILURE if failures else cli.EXIT_OK


class SampleWorker:
    """A Ray actor measuring samples as evaluate.py does: one network, predictions saved here."""

    def __init__(self, config, weights, samples, save_dir, protocol, pool, attempts):
        start_worker_process(pool)
        self.attempts = attempts
        self.samples, self.save_dir, self.protocol = samples, save_dir, protocol
        self.network, self.fatal = None, ""
        try:
            self.network = load_network(config, weights)
        except cli.CommandError as error:
            self.fatal = str(error)

    def __call__(self, row):
        """Measures the sample numbered row["key"]: the nonzero cells of its confusion matrix
        (flat indices and counts) and its undefined label values, or why it was skipped."""
        result = {"key": row["key"], "fatal": self.fatal, "skipped": "", "problem": "",
                  "cells": [], "counts": [], "undefined": [], "warnings": []}
        if self.fatal:
            return result
        sample = self.samples[row["key"]]
        result["warnings"], failure = attempt_problems(import_ray(), self.attempts, row["key"], str(sample.image))
        if failure:
            result.update(skipped=str(sample.image), problem=failure.removeprefix(f"{sample.image}: "))
            return result
        try:
            confusion, undefined = scoring.measure_sample(
                self.network, sample, self.save_dir, self.protocol
            )
        except datasets.SampleError as error:
            result.update(skipped=str(error.path), problem=error.problem)
            return result
        cells = np.flatnonzero(confusion)
        result.update(cells=cells.tolist(), counts=confusion.flat[cells].tolist(), undefined=list(undefined))
        return result


def evaluate_samples(prog, args, config, samples, order, protocol, tally):
    """Adds every sample to `tally` as evaluate.py does, measured by Ray workers; `order` lists the
    sample numbers in the order the single-process run takes them, which the report keeps. `prog`
    names the command in the lines it prints."""
    ray = import_ray()
    position = {index: place for place, index in enumerate(order)}
    classes = len(tally.confusion)

    def count(result):
        index = result["key"]
        if result["skipped"]:
            tally.skip(datasets.SampleError(Path(result["skipped"]), result["problem"]), position[index])
            return
        confusion = np.zeros(classes * classes, np.int64)
        confusion[np.asarray(result["cells"], np.int64)] = result["counts"]
        tally.add(samples[index], confusion.reshape(classes, classes), tuple(result["undefined"]), position[index])

    arguments = {"config": config, "weights": args.weights, "samples": samples,
                 "save_dir": args.save_dir, "protocol": protocol}
    try:
        with ray_session(ray, args.ray, False) as (embedded, nodes):
            pool = start_pool(prog, nodes, embedded, args, False)
            arguments.update(pool=pool, attempts=new_attempts(ray))
            results = map_with_pool(ray, [{"key": index} for index in order], SampleWorker, arguments, pool)
            consume(prog, results, len(order), False, count)
    finally:
        if args.save_dir is not None:
            remove_temporaries(scoring.prediction_path(args.save_dir, sample) for sample in samples)
