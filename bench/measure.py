"""What every benchmark here shares: calls timed in turns, their spread, the CPU they ran on.

Figures from different CPU kinds are never compared as if alike: each results file
names the kind (`cpu_kind`), and every report prints the SIMD flags it ran with.
"""

import importlib.metadata
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from datetime import timezone
from pathlib import Path

import numpy as np

# The instruction sets that decide a convolution's speed on x86, in the order they add up.
KIB = 1024
# The exit status of a benchmark stopped by SIGTERM, as the commands' (128 + 15).
EXIT_TERMINATED = 143
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def seconds_in_turns(calls, warmup, runs):
    """{name: [seconds of each timed call]} of `calls` ({name: function}), called in turns.

    `warmup` rounds, then `runs` rounds, each calling every function once, so that
    a machine whose speed drifts slows all of them alike.
    """
    times = {name: [] for name in calls}
    for round_number in range(warmup + runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_number >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_seconds(call, warmup, runs):
    """The median seconds of `runs` calls of `call` after `warmup` calls."""
    return statistics.median(seconds_in_turns({"call": call}, warmup, runs)["call"])


def percentile(values, fraction):
    """The `fraction` quantile of `values`, interpolated between the nearest ranks."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def spread(values):
    """{"p50_s", "p90_s", "p90_over_p50"} of a list of seconds."""
    p50, p90 = percentile(values, 0.5), percentile(values, 0.9)
    return {"p50_s": p50, "p90_s": p90, "p90_over_p50": p90 / p50}


def cpu_facts():
    """The CPU this runs on: model name, the SIMD_FLAGS it has, usable cores, and its kind."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    simd = [flag for flag in SIMD_FLAGS if flag in flags]
    return {
        "cpu": fields.get("model name", platform.processor()),
        "simd": " ".join(simd),
        "cores": len(os.sched_getaffinity(0)),
        "kind": cpu_kind(simd, len(os.sched_getaffinity(0))),
    }


def cpu_kind(simd, cores):
    """A file-name slug of a CPU kind: its widest vector instructions and its usable cores."""
    if "amx_tile" in simd:
        widest = "amx"
    elif "avx512_bf16" in simd:
        widest = "avx512bf16"
    elif "avx512f" in simd:
        widest = "avx512"
    elif "avx2" in simd:
        widest = "avx2"
    else:
        widest = platform.machine() or "cpu"
    return f"{widest}_{cores}core"


def onnxruntime_session(path, threads):
    """An fp32 CPU ONNX Runtime session of `path` with all graph optimisations, run sequentially.

    `path` is an .onnx file (str or Path) or a serialized model (bytes); `threads` intra-op
    threads, one inter-op thread. Every bench script opens its sessions here, so their figures
    come from the same settings.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = path if isinstance(path, bytes) else str(path)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def progress(prog, message):
    """A progress line of the benchmark `prog` on stderr."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def run_in_temporary_folder(prog, run_benchmark, args, results_path, report_text):
    """Runs run_benchmark(args, work folder) in a temporary folder, removed after it (SIGTERM ends the
    run as an exit does, 143), and publishes its results at results_path(args, machine); returns 0."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(EXIT_TERMINATED))
    with tempfile.TemporaryDirectory(prefix=f"pspnet-{Path(prog).stem}-") as work_dir:
        results = run_benchmark(args, work_dir)
    publish(prog, results_path(args, results["machine"]), results, report_text(results))
    return 0


def reprint_or_run(prog, run_benchmark, args, results_path, report_text):
    """The `main` of a benchmark with --from-json: prints the report of the saved run args.from_json, or
    runs the benchmark (run_in_temporary_folder); returns 0."""
    if args.from_json is not None:
        print(report_text(json.loads(Path(args.from_json).read_text())))
        return 0
    return run_in_temporary_folder(prog, run_benchmark, args, results_path, report_text)


def publish(prog, path, results, report_text):
    """Writes `results` as JSON to `path`, atomically, and prints the report; says where on stderr."""
    import utils

    utils.write_json_atomic(path, results)
    print(report_text)
    print(f"{prog}: wrote {path}", file=sys.stderr)


def logit_agreement(logits, reference):
    """How close (H, W, C) logits are to reference logits: max |difference| relative to their range."""
    difference = float(np.abs(logits - reference).max())
    logit_range = float(reference.max() - reference.min())
    return {
        "max_abs_diff": difference,
        "logit_range": logit_range,
        "relative_diff": difference / logit_range,
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }


def markdown_table(header, rows):
    """A Markdown table of `header` and `rows` (lists of cell strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def peak_rss_mib(pid="self"):
    """The peak resident memory of process `pid` (default: this one) since it started its program
    (VmHWM, proc(5)), MiB."""
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KIB
    raise RuntimeError(f"{status} has no VmHWM line")


def machine_info(packages):
    """The machine (cpu_facts, memory, platform), the versions of `packages`, the date and the load
    average at the start of a run."""
    facts = cpu_facts()
    return {
        "cpu": facts["cpu"],
        "simd": facts["simd"],
        "cpu_kind": facts["kind"],
        "cores": facts["cores"],
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: importlib.metadata.version(name) for name in packages},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
    }
