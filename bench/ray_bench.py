"""Images per minute of `pspnet.py -g` in one process and on Ray, and what Ray costs.

    python -m bench.ray_bench [--images 8] [--rounds 1] [--weights H5] [--json FILE]

Runs `pspnet.py -m pspnet50_ade20k -g DIR/*.png -o OUT` over the same images three
ways, as a user runs it: in one process, with `--ray --workers 1` (one worker of all
the cores) and with `--ray --workers 2` (two workers sharing them). The ways take
turns for --rounds rounds. Each run's stdout is read as it comes; the time of each
image's summary line gives t_k, the time the k-th image was done, and a least-squares
line t_k = a + b k gives the run's start-up a (process start, TensorFlow, the model;
for Ray also Ray's start and its workers' start) and its seconds per image b. From the
medians over the rounds:

- Ray's fixed start-up cost: a(--workers 1) - a(one process);
- Ray's per-image cost: b(--workers 1) - b(one process), both with all the cores;
- two workers against one: b(one process) / b(--workers 2).

The images are the project's example photographs, each copied --images / 4 times;
the weights are the tests' seeded synthetic pspnet50_ade20k weights unless --weights.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
EXAMPLE_IMAGES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
MODEL = "pspnet50_ade20k"
# (name, pspnet.py flags) of the three ways, in the order each round runs them.
WAYS = (
    ("one process", ()),
    ("--ray --workers 1", ("--ray", "--workers", "1")),
    ("--ray --workers 2", ("--ray", "--workers", "2")),
)
RUN_TIMEOUT_S = 3600


def synthetic_weights(directory):
    """The tests' seeded synthetic weights of MODEL, converted as the tests convert them; their path."""
    from bench.synthetic_caffe import SyntheticModel

    return SyntheticModel(MODEL, Path(directory)).converted_h5


def copy_images(directory, count):
    """`count` image files in `directory`: the example photographs, each copied in turn, as PNG or JPEG."""
    directory.mkdir(parents=True)
    for index in range(count):
        source = PROJECT_ROOT / "example_images" / EXAMPLE_IMAGES[index % len(EXAMPLE_IMAGES)]
        shutil.copyfile(source, directory / f"{index:03d}_{source.name}")
    return directory


def timed_run(flags, weights, images, out):
    """Runs pspnet.py over `images` with `flags`; returns the total seconds and the seconds at which
    each image's summary line came."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(PROJECT_ROOT / "pspnet.py"), "-m", MODEL, "-w", str(weights),
               "-g", str(images / "*"), "-o", str(out), *flags]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    done = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=environment) as process:
        for line in process.stdout:
            if line.startswith(str(images)):
                done.append(time.monotonic() - start)
        code = process.wait(timeout=RUN_TIMEOUT_S)
    total = time.monotonic() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited with {code}")
    return total, done


def line_fit(times):
    """(a, b) of the least-squares line t_k = a + b k through the times t_1 .. t_n."""
    ks = range(1, len(times) + 1)
    mean_k, mean_t = statistics.fmean(ks), statistics.fmean(times)
    b = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, times)) / sum((k - mean_k) ** 2 for k in ks)
    return mean_t - b * mean_k, b


def summarise(runs, images):
    """Per way: median total seconds, images per minute, start-up a and seconds per image b."""
    table = {}
    for name, measured in runs.items():
        fits = [line_fit(done) for _, done in measured]
        total = statistics.median(total for total, _ in measured)
        table[name] = {
            "total_s": total,
            "images_per_minute": 60 * images / total,
            "start_up_s": statistics.median(a for a, _ in fits),
            "seconds_per_image": statistics.median(b for _, b in fits),
            "runs": [{"total_s": total, "done_s": done} for total, done in measured],
        }
    return table


def derived(table):
    """Ray's fixed start-up cost, its per-image cost, and two workers against one process."""
    single, one, two = (table[name] for name, _ in WAYS)
    return {
        "ray_start_up_s": one["start_up_s"] - single["start_up_s"],
        "ray_per_image_s": one["seconds_per_image"] - single["seconds_per_image"],
        "two_workers_speed_up": single["seconds_per_image"] / two["seconds_per_image"],
    }


def print_report(report):
    """The table of a report and the figures derived from it."""
    print(f"load average before {report['load_before']}, after {report['load_after']}; "
          f"{report['images']} images, {report['rounds']} round(s), {os.cpu_count()} cores")
    print(f"{'way':<20} {'total s':>8} {'images/min':>11} {'start-up s':>11} {'s / image':>10}")
    for name, row in report["table"].items():
        print(f"{name:<20} {row['total_s']:>8.1f} {row['images_per_minute']:>11.2f} "
              f"{row['start_up_s']:>11.1f} {row['seconds_per_image']:>10.2f}")
    figures = report["derived"]
    print(f"Ray's fixed start-up cost {figures['ray_start_up_s']:.1f} s, per-image cost "
          f"{figures['ray_per_image_s']:+.2f} s; two workers run {figures['two_workers_speed_up']:.2f}x "
          "the images per second of one process")


def main():
    """Runs the benchmark the command line asks for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three ways (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help=f"{MODEL} weights (default: the tests' synthetic ones)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray_bench.") as scratch:
        scratch = Path(scratch)
        weights = args.weights or synthetic_weights(scratch)
        images = copy_images(scratch / "images", args.images)
        load_before = os.getloadavg()
        runs = {name: [] for name, _ in WAYS}
        for _ in range(args.rounds):
            for name, flags in WAYS:
                runs[name].append(timed_run(flags, weights, images, scratch / "out"))
        load_after = os.getloadavg()
    table = summarise(runs, args.images)
    report = {
        "images": args.images, "rounds": args.rounds, "load_before": load_before, "load_after": load_after,
        "table": table, "derived": derived(table),
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
