"""The video path of pspnet.py against the network's own rate, in turns, and its memory against the clip's length.

    python -m bench.video [--frames 12] [--rounds 3] [--results bench/results]
    python -m bench.video --dry-run --results /tmp/dry       # tiny everything (tests/test_bench_video.py)
    python -m bench.video --from-json FILE                   # print the tables of a saved run again

The clips are made here with PyAV (pyav.org): 1280x720 at 24 frames per second, H.264 in
yuv420p in an .mp4, coloured shapes moving smoothly over a shifting gradient (so that every
frame differs from the last) and an AAC sound track, in a temporary folder.

1. The network alone: pspnet50_ade20k at its full crop (473), loaded by segmenter.PSPNet, and
   `Predictor.window_probabilities(windows, flip=True, batch_size=B)` on the clip's frames
   scaled and preprocessed as the default mode does (one crop per frame, and its mirror: 2
   passes), for B = 1 and B = 2, to show which batch is the fastest on this CPU.
2. The video pipeline: `video.segment_video` on the clip in the default mode with flip, at
   pspnet.py's batch on a CPU (video.CPU_BATCH): decoding, the network, the resize of each
   frame's probabilities, colouring and H.264 encoding of the two output videos, each in a
   thread of its own. Frames per second over the whole clip, and the ratio of its network
   passes per second (frames per second x passes per frame) to the network's alone at the
   same batch. The goal is a ratio of at least RATIO_GOAL: the threads around the network
   should cost it little.

Both are timed after a warm-up (the network compiled for each batch, the pipeline run on a
two-frame clip), in rounds: each round gives every measurement one turn, in an order rotated
from round to round, so that a machine whose speed drifts (shared cores) slows all of them
alike. p50 and p90 are over the rounds; the ratio is that of the p50s.

3. Memory: the peak resident memory of `pspnet.py -w SMALL -i clip.mp4 -o out/clip.mp4 -q
   --every 12` on a 10-second and a 60-second clip, SMALL being the same weights as a user
   model of 137-pixel crops. Each command runs under a fresh Python wrapper that reports its
   one child's ru_maxrss (RUSAGE_CHILDREN, getrusage(2)): on Linux a process's ru_maxrss
   starts from the resident memory of the process it was forked from, kept over exec
   (fs/exec.c, exec_mmap), so that a command started by this one directly would count what
   this one holds; the wrapper holds about 10 MiB. The two peaks should be the same: memory
   must not grow with the length of the video. They are measured first, before this process
   loads a network.

The results file, video_<model>_<cpu kind>.json (bench/measure.py's kind: widest vector
instructions and usable cores), records the CPU flags, the cores, the package and FFmpeg
library versions and the dates. --dry-run is the same at 320x240 with six frames, a user
model of 41-pixel crops for the network and the pipeline, 2- and 4-second clips for memory
and one round, for the tests. Weights are the seeded synthetic ones of
bench/synthetic_caffe.py converted by weight_converter.py: the speed does not depend on their
values, and no output here is a segmentation result.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from datetime import timezone
from fractions import Fraction
from pathlib import Path

import numpy as np

from bench import measure
from pspnet_keras import runtime
from pspnet_keras import video

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/video.py"
MODEL = "pspnet50_ade20k"
PACKAGES = ("keras", "numpy", "av", "pillow", "h5py", "threadpoolctl")
ROUNDS = 3
FRAMES = 12
DRY_RUN_FRAMES = 6
WARMUP_FRAMES = 2
# pspnet.py's default mode: one crop of the whole frame scaled to the crop size, and its mirror.
PROTOCOL = {"sliding": False, "flip": True, "multi_scale": False}
# The network alone at these batches: 1, 2, and pspnet.py's on a CPU, which the pipeline runs.
NETWORK_BATCHES = tuple(sorted({1, 2, video.CPU_BATCH}))
RATIO_GOAL = 0.95
# The measurements of a round, in the first round's order.
TURNS = (*(f"network_batch_{batch_size}" for batch_size in NETWORK_BATCHES), "pipeline")

# The clips: (width, height), frames per second, H.264 at x264's default quality (crf 23), AAC sound.
CLIP_SIZE = (1280, 720)
DRY_RUN_CLIP_SIZE = (320, 240)
FRAME_RATE = 24
CLIP_CODEC = "libx264"
CLIP_PIXEL_FORMAT = "yuv420p"
CLIP_OPTIONS = {"crf": "23", "preset": "veryfast"}
AUDIO_CODEC = "aac"
AUDIO_RATE = 48000
AUDIO_CHUNK = 1024
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.2
TONE_BEAT_HZ = 0.5
# Moving shapes: (kind, RGB colour, half size as a fraction of the height, seconds per sweep across, seconds
# per sweep down, phase); their centres follow sines over SWEEP of the frame around its centre.
SHAPES = (
    ("disc", (230, 60, 50), 0.16, 5.0, 3.0, 0.0),
    ("disc", (40, 200, 90), 0.11, 4.0, 6.0, 1.3),
    ("box", (250, 210, 40), 0.13, 7.0, 4.5, 2.1),
    ("box", (60, 90, 230), 0.09, 3.5, 5.5, 4.0),
    ("disc", (200, 70, 220), 0.07, 6.0, 2.5, 5.2),
)
SWEEP = 0.35
BACKGROUND_PERIOD_S = 8.0

# Memory: pspnet.py on clips of these lengths with a user model of the same weights at a small crop.
MEMORY_SECONDS = (10, 60)
DRY_RUN_MEMORY_SECONDS = (2, 4)
MEMORY_EVERY = 12
MEMORY_CROP = 137
MEMORY_BASE_SIZE = 160
DRY_RUN_CROP = 41
DRY_RUN_BASE_SIZE = 48
# A fresh Python that runs the command given as its arguments (stdout discarded), prints the peak resident
# memory of that one child in KiB (getrusage(2), RUSAGE_CHILDREN) and exits with the child's status.
PEAK_WRAPPER = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(code)"
)
STDERR_TAIL_CHARS = 2000


# --------------------------------------------------------------------------------------
# Clips


def clip_frame(index, width, height):
    """Frame `index` of a clip: uint8 (height, width, 3) RGB, the SHAPES over a gradient, all moving."""
    seconds = index / FRAME_RATE
    columns = np.linspace(0.0, 1.0, width, dtype=np.float32)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)
    shift = seconds / BACKGROUND_PERIOD_S
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[..., 0] = (90 + 60 * np.sin(2 * np.pi * (columns + shift)))[np.newaxis, :]
    frame[..., 1] = (110 + 50 * rows)[:, np.newaxis]
    frame[..., 2] = (120 + 40 * np.sin(2 * np.pi * (rows[:, np.newaxis] - shift)) + 30 * np.cos(np.pi * columns))
    for kind, colour, half_size, across_s, down_s, phase in SHAPES:
        centre_x = width * (0.5 + SWEEP * math.sin(2 * math.pi * seconds / across_s + phase))
        centre_y = height * (0.5 + SWEEP * math.cos(2 * math.pi * seconds / down_s + phase))
        draw_shape(frame, kind, colour, centre_x, centre_y, half_size * height)
    return frame


def draw_shape(frame, kind, colour, centre_x, centre_y, half_size):
    """Paints a disc of radius `half_size`, or a square of half side `half_size`, centred at (x, y)."""
    height, width = frame.shape[:2]
    top, bottom = max(0, int(centre_y - half_size)), min(height, int(centre_y + half_size) + 1)
    left, right = max(0, int(centre_x - half_size)), min(width, int(centre_x + half_size) + 1)
    if kind == "box":
        frame[top:bottom, left:right] = colour
        return
    rows = np.arange(top, bottom)[:, np.newaxis] - centre_y
    columns = np.arange(left, right)[np.newaxis, :] - centre_x
    frame[top:bottom, left:right][rows**2 + columns**2 <= half_size**2] = colour


def tone(first_sample, samples):
    """`samples` float32 samples of the sound track from `first_sample` on: a tone beating slowly."""
    times = np.arange(first_sample, first_sample + samples) / AUDIO_RATE
    beat = 0.6 + 0.4 * np.sin(2 * np.pi * TONE_BEAT_HZ * times)
    return (TONE_AMPLITUDE * beat * np.sin(2 * np.pi * TONE_HZ * times)).astype(np.float32)


def write_clip(path, width, height, frames):
    """Writes a clip of `frames` frames (clip_frame) at FRAME_RATE, H.264 yuv420p, with a mono AAC sound
    track as long as the frames, interleaved with them, into the .mp4 `path`."""
    import av

    with av.open(os.fspath(path), "w") as container:
        picture = container.add_stream(CLIP_CODEC, rate=FRAME_RATE, options=dict(CLIP_OPTIONS))
        picture.width, picture.height, picture.pix_fmt = width, height, CLIP_PIXEL_FORMAT
        sound = container.add_stream(AUDIO_CODEC, rate=AUDIO_RATE, layout="mono")
        samples_written = 0
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(clip_frame(index, width, height), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FRAME_RATE)
            container.mux(picture.encode(frame))
            sound_end = (index + 1) * AUDIO_RATE // FRAME_RATE
            while samples_written < sound_end:
                samples = min(AUDIO_CHUNK, sound_end - samples_written)
                chunk = av.AudioFrame.from_ndarray(tone(samples_written, samples)[np.newaxis], format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = AUDIO_RATE, samples_written, Fraction(1, AUDIO_RATE)
                container.mux(sound.encode(chunk))
                samples_written += samples
        container.mux(picture.encode())
        container.mux(sound.encode())
    return path


def video_frames_in(path):
    """The frames of the first video stream of a file, counted by its packets (one frame each in H.264)."""
    import av

    with av.open(os.fspath(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size > 0)


def decoded_frames(path):
    """The uint8 RGB frames of a clip, decoded as video.FrameReader decodes them."""
    import av

    with av.open(os.fspath(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


# --------------------------------------------------------------------------------------
# Models


def synthetic_h5(work_dir):
    """The seeded synthetic MODEL weights converted by weight_converter.py (a process of its own)."""
    from bench.synthetic_caffe import SyntheticModel

    return SyntheticModel(MODEL, work_dir).converted_h5


def user_model(h5, crop_size, base_size, work_dir):
    """The weights `h5` as a user model of crop `crop_size`: a link to them and its description beside it."""
    from pspnet_keras import models

    link = Path(work_dir) / f"{MODEL}_crop{crop_size}.h5"
    link.symlink_to(h5)
    description = {**models.RELEASED_MODELS[MODEL].description(), "crop_size": crop_size, "base_size": base_size}
    models.description_path(link).write_text(json.dumps(description))
    return link


# --------------------------------------------------------------------------------------
# The network and the pipeline, in turns


def process_cpu_seconds():
    """The processor seconds this process has used so far, user + system, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(call):
    """({"wall_s", "cpu_s"}, result) of one call of `call`: its wall seconds, the processor seconds of this
    process meanwhile (process_cpu_seconds), and what it returned."""
    cpu_start, wall_start = process_cpu_seconds(), time.perf_counter()
    result = call()
    return {"wall_s": time.perf_counter() - wall_start, "cpu_s": process_cpu_seconds() - cpu_start}, result


def frame_windows(net, frames):
    """The network inputs of the default mode for each frame (inference.Predictor.windows): preprocessed
    crops of the frame scaled to the crop size, one per frame."""
    from pspnet_keras.inference import ScaleMap

    (long_side,) = net.predictor.long_sides(PROTOCOL["sliding"], PROTOCOL["multi_scale"])
    return [window for frame in frames for window in net.predictor.windows(frame, long_side, ScaleMap())]


def run_network(net, windows, batch_size):
    """Every window through `window_probabilities` with the mirror, `batch_size` crops at a time, the
    probabilities read back to NumPy as the pipeline reads them."""
    for _ in net.predictor.window_probabilities(windows, flip=PROTOCOL["flip"], batch_size=batch_size):
        pass


def run_pipeline(net, clip, stem):
    """`video.segment_video` on `clip` into the outputs of `stem`, as pspnet.py runs it on a CPU; its End."""
    end, _ = video.segment_video(
        net, clip, video.output_paths(stem, ".mp4", False), dict(PROTOCOL), batch_size=video.CPU_BATCH,
        quiet=True, warn=lambda line: measure.progress(PROG, line),
    )
    return end


def checked_end(end, frames, clip):
    """The frames the pipeline read; stops the benchmark when they are not the clip's `frames`."""
    if end.cut_short is not None or end.frames != frames:
        raise SystemExit(f"{PROG}: {clip}: the pipeline read {end.frames} of {frames} frames ({end.cut_short})")
    return end.frames


def turn_calls(net, windows, clip, stem, frames):
    """{turn: function giving its timing} of a round's turns (TURNS)."""

    def pipeline():
        timing, end = timed(lambda: run_pipeline(net, clip, stem))
        return timing | {"frames": checked_end(end, frames, clip)}

    def network(batch_size):
        return lambda: timed(lambda: run_network(net, windows, batch_size))[0] | {"crops": len(windows)}

    calls = {f"network_batch_{batch_size}": network(batch_size) for batch_size in NETWORK_BATCHES}
    return calls | {"pipeline": pipeline}


def warm_up(net, windows, warmup_clip, stem):
    """Compiles the network for every batch and runs the pipeline once on a short clip."""
    for batch_size in NETWORK_BATCHES:
        run_network(net, windows[:batch_size], batch_size)
    checked_end(run_pipeline(net, warmup_clip, stem), WARMUP_FRAMES, warmup_clip)


def run_rounds(calls, rounds):
    """Every turn of `calls` once per round, in an order rotated from round to round: (rounds, orders),
    each round {turn: timing}."""
    results, orders = [], []
    for round_number in range(rounds):
        shift = round_number % len(TURNS)
        order = list(TURNS[shift:] + TURNS[:shift])
        figures = {}
        for turn in order:
            measure.progress(PROG, f"round {round_number + 1} of {rounds}: {turn}")
            figures[turn] = calls[turn]()
        results.append(figures)
        orders.append(order)
    return results, orders


# --------------------------------------------------------------------------------------
# Memory


def peak_of_command(command, work_dir):
    """(peak resident MiB, wall seconds) of `command` run under PEAK_WRAPPER in a fresh Python; stops the
    benchmark with the end of its stderr when it fails."""
    stderr_path = Path(work_dir) / "stderr.txt"
    start = time.perf_counter()
    with open(stderr_path, "w") as stderr:
        done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *command], stdout=subprocess.PIPE,
                              stderr=stderr, text=True, cwd=PROJECT_ROOT)
    wall_s = time.perf_counter() - start
    if done.returncode:
        tail = stderr_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
        raise SystemExit(f"{PROG}: {' '.join(command)} failed with exit code {done.returncode}:\n{tail}")
    return int(done.stdout.split()[-1]) / measure.KIB, wall_s


def memory_run(weights, clip, seconds, work_dir):
    """pspnet.py on `clip` with `weights`, one frame in MEMORY_EVERY segmented: its peak, wall time, the frames
    of the clip and of its blended output."""
    out = Path(work_dir) / f"out_{seconds}s"
    out.mkdir()
    command = [
        sys.executable, str(PROJECT_ROOT / "pspnet.py"), "-w", str(weights), "-i", str(clip),
        "-o", str(out / "clip.mp4"), "-q", "--every", str(MEMORY_EVERY),
    ]
    peak_mib, wall_s = peak_of_command(command, work_dir)
    frames = video_frames_in(clip)
    return {
        "seconds": seconds,
        "frames": frames,
        "segmented_frames": math.ceil(frames / MEMORY_EVERY),
        "peak_rss_mib": peak_mib,
        "wall_s": wall_s,
        "output_frames": video_frames_in(video.output_paths(out / "clip", ".mp4", False)["seg_blended"]),
    }


def measure_memory(h5, size, lengths, work_dir):
    """Peak memory of pspnet.py on a clip of each of `lengths` seconds, and the growth from the first to the last."""
    weights = user_model(h5, MEMORY_CROP, MEMORY_BASE_SIZE, work_dir)
    runs = []
    for seconds in lengths:
        measure.progress(PROG, f"memory: pspnet.py on a {seconds}-second clip")
        clip = write_clip(Path(work_dir) / f"clip_{seconds}s.mp4", *size, seconds * FRAME_RATE)
        runs.append(memory_run(weights, clip, seconds, work_dir))
    growth = runs[-1]["peak_rss_mib"] - runs[0]["peak_rss_mib"]
    return {
        "model": {"crop_size": MEMORY_CROP, "base_size": MEMORY_BASE_SIZE},
        "command": f"pspnet.py -w {MODEL}_crop{MEMORY_CROP}.h5 -i clip.mp4 -o out/clip.mp4 -q --every {MEMORY_EVERY}",
        "every": MEMORY_EVERY,
        "runs": runs,
        "growth_mib": growth,
        "growth_fraction": growth / runs[0]["peak_rss_mib"],
    }


# --------------------------------------------------------------------------------------
# Summary


def network_summary(rounds, turn, passes_per_crop):
    """One network batch over the rounds: seconds per crop (p50, p90), crops and passes per second at the p50."""
    per_crop = [figures[turn]["wall_s"] / figures[turn]["crops"] for figures in rounds]
    cpu_per_crop = [figures[turn]["cpu_s"] / figures[turn]["crops"] for figures in rounds]
    p50 = measure.percentile(per_crop, 0.5)
    return measure.spread(per_crop) | {
        "per_round_s": per_crop,
        "cpu_s_per_crop_p50": measure.percentile(cpu_per_crop, 0.5),
        "crops_per_s": 1 / p50,
        "passes_per_s": passes_per_crop / p50,
    }


def pipeline_summary(rounds, passes_per_frame):
    """The pipeline over the rounds: seconds per frame (p50, p90), frames and passes per second at the p50."""
    per_frame = [figures["pipeline"]["wall_s"] / figures["pipeline"]["frames"] for figures in rounds]
    cpu_per_frame = [figures["pipeline"]["cpu_s"] / figures["pipeline"]["frames"] for figures in rounds]
    p50 = measure.percentile(per_frame, 0.5)
    return measure.spread(per_frame) | {
        "per_round_s": per_frame,
        "frames_per_round": [figures["pipeline"]["frames"] for figures in rounds],
        "cpu_s_per_frame_p50": measure.percentile(cpu_per_frame, 0.5),
        "frames_per_s": 1 / p50,
        "passes_per_s": passes_per_frame / p50,
    }


def ratio_summary(rounds, pipeline, network, passes_per_crop, passes_per_frame):
    """The pipeline's network passes per second over the network's alone: from the p50s, and per round."""
    peer = f"network_batch_{video.CPU_BATCH}"
    per_round = [
        (passes_per_frame * figures[peer]["wall_s"] / figures[peer]["crops"])
        / (passes_per_crop * figures["pipeline"]["wall_s"] / figures["pipeline"]["frames"])
        for figures in rounds
    ]
    ratio = pipeline["passes_per_s"] / network[str(video.CPU_BATCH)]["passes_per_s"]
    return {"pipeline_over_network": ratio, "per_round": per_round, "goal": RATIO_GOAL, "met": ratio >= RATIO_GOAL}


# --------------------------------------------------------------------------------------
# Report


def speed_table(results):
    """The network at each batch and the pipeline as a Markdown table."""
    rows = []
    reference = results["network"][str(results["pipeline"]["batch_size"])]["passes_per_s"]
    for batch_size, summary in results["network"].items():
        rows.append([
            f"network alone, batch {batch_size}", "crop", f"{summary['p50_s']:.3f}", f"{summary['p90_s']:.3f}",
            f"{summary['p90_over_p50']:.2f}", f"{summary['cpu_s_per_crop_p50']:.2f}", f"{summary['crops_per_s']:.3f}",
            f"{summary['passes_per_s']:.3f}", f"{summary['passes_per_s'] / reference:.2f}",
        ])
    pipeline = results["pipeline"]
    rows.append([
        f"video pipeline, batch {pipeline['batch_size']}", "frame", f"{pipeline['p50_s']:.3f}",
        f"{pipeline['p90_s']:.3f}", f"{pipeline['p90_over_p50']:.2f}", f"{pipeline['cpu_s_per_frame_p50']:.2f}",
        f"{pipeline['frames_per_s']:.3f}", f"{pipeline['passes_per_s']:.3f}",
        f"{pipeline['passes_per_s'] / reference:.2f}",
    ])
    header = [
        "measured", "per", "p50 s", "p90 s", "p90/p50", "CPU s (p50)", "per second (p50)", "passes/s (p50)",
        f"÷ network batch {pipeline['batch_size']}",
    ]
    return measure.markdown_table(header, rows)


def memory_table(memory):
    """The pspnet.py runs of the memory measurement as a Markdown table."""
    rows = [
        [
            f"{run['seconds']} s", str(run["frames"]), str(run["segmented_frames"]), str(run["output_frames"]),
            f"{run['wall_s']:.1f}", f"{run['peak_rss_mib']:.0f}",
        ]
        for run in memory["runs"]
    ]
    return measure.markdown_table(["clip", "frames", "segmented", "frames written", "wall s", "peak RSS MiB"], rows)


def report_text(results):
    """The whole report: machine, settings, the speed and memory tables, the ratio against its goal."""
    machine, clip, ratio, memory = results["machine"], results["clip"], results["ratio"], results["memory"]
    flags = machine["simd"] or f"none of {' '.join(measure.SIMD_FLAGS)}"
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    start, end = machine["loadavg_start"], machine["loadavg_end"]
    first, last = memory["runs"][0], memory["runs"][-1]
    return "\n".join([
        f"Machine: {machine['cpu']}, {machine['cores']} usable cores ({machine['cpu_kind']}), flags: {flags}; "
        f"{machine['memory_gib']:.0f} GiB, {machine['platform']}, Python {machine['python']}",
        f"Packages: {packages}; {results['framework']}; FFmpeg libavcodec {results['ffmpeg']['libavcodec']}",
        f"{machine['date']} to {machine['date_end']}; load average (1/5/15 min) start "
        f"{start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f}, end {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f}",
        f"{results['model']} at crop {results['crop_size']}, float32, seeded synthetic weights; clip "
        f"{clip['width']}x{clip['height']}, {clip['fps']} fps, {clip['frames']} frames, H.264 {clip['pixel_format']} "
        f"+ AAC; default mode with flip ({results['passes_per_frame']} passes per frame); rounds in turns: "
        f"{results['rounds']} (orders: " + "; ".join(" ".join(order) for order in results["orders"]) + ")",
        "",
        "Seconds per crop (network alone: window_probabilities on the clip's preprocessed crops) and per frame "
        "(video.segment_video, decoding to encoding); p50/p90 over rounds; CPU s: processor seconds of the "
        "process, all threads:",
        "",
        speed_table(results),
        "",
        f"Pipeline ÷ network at batch {results['pipeline']['batch_size']}, network passes per second from the "
        f"p50s: {ratio['pipeline_over_network']:.3f} "
        f"(goal >= {ratio['goal']}: {'met' if ratio['met'] else 'not met'}); "
        "per round: " + ", ".join(f"{value:.3f}" for value in ratio["per_round"]),
        f"Fastest network batch on this CPU: {results['fastest_batch']}",
        "",
        f"Peak memory of `{memory['command']}` (user model of crop {memory['model']['crop_size']}), each run "
        "under a fresh wrapper process:",
        "",
        memory_table(memory),
        "",
        f"Peak {last['seconds']} s − {first['seconds']} s: {memory['growth_mib']:+.1f} MiB "
        f"({memory['growth_fraction']:+.1%}) ({first['peak_rss_mib']:.0f} and {last['peak_rss_mib']:.0f} MiB)",
    ])


# --------------------------------------------------------------------------------------
# Command line


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int,
                        help=f"frames of the clip, a multiple of {max(NETWORK_BATCHES)} (default: {FRAMES}, "
                        f"{DRY_RUN_FRAMES} with --dry-run)")
    parser.add_argument("--rounds", type=int,
                        help=f"rounds, each timing every measurement once (default: {ROUNDS}, 1 with --dry-run)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results",
                        help="folder of the results file (default: bench/results)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"{DRY_RUN_CLIP_SIZE[0]}x{DRY_RUN_CLIP_SIZE[1]} clips, crop {DRY_RUN_CROP}, "
                        f"{'- and '.join(map(str, DRY_RUN_MEMORY_SECONDS))}-second clips for memory, one round: "
                        "checks the benchmark, measures nothing")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="print the report of an earlier results file and measure nothing")
    return parser


def checked_arguments(argv):
    """The parsed command line, with its checks and the dry run's settings."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.frames is None:
        args.frames = DRY_RUN_FRAMES if args.dry_run else FRAMES
    if args.rounds is None:
        args.rounds = 1 if args.dry_run else ROUNDS
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.frames < 1 or any(args.frames % batch_size for batch_size in NETWORK_BATCHES):
        parser.error(f"--frames must be a positive multiple of {math.lcm(*NETWORK_BATCHES)}")
    if args.from_json is None and not args.results.is_dir():
        parser.error(f"--results {args.results}: no such directory")
    args.clip_size = DRY_RUN_CLIP_SIZE if args.dry_run else CLIP_SIZE
    args.memory_seconds = DRY_RUN_MEMORY_SECONDS if args.dry_run else MEMORY_SECONDS
    return args


def results_path(args, machine):
    """The results file: video_<model>_<cpu kind>.json in --results, _dry_run added for a dry run."""
    suffix = "_dry_run" if args.dry_run else ""
    return args.results / f"video_{MODEL}_{machine['cpu_kind']}{suffix}.json"


def load_network(h5, args, work_dir):
    """The network measured: MODEL at its crop, or in a dry run the same weights as a user model of crop 41."""
    from pspnet_keras.segmenter import PSPNet

    weights = user_model(h5, DRY_RUN_CROP, DRY_RUN_BASE_SIZE, work_dir) if args.dry_run else h5
    return PSPNet(weights=weights, show_progress=False)


def run_benchmark(args, work_dir):
    """Makes the weights and the clips, measures memory, then the rounds; returns the results."""
    import av

    machine = measure.machine_info(PACKAGES)
    work_dir = Path(work_dir)
    measure.progress(PROG, "synthetic weights, converted by weight_converter.py")
    h5 = synthetic_h5(work_dir)
    memory = measure_memory(h5, args.clip_size, args.memory_seconds, work_dir)
    measure.progress(PROG, f"clips of {args.frames} and {WARMUP_FRAMES} frames, {args.clip_size[0]}x{args.clip_size[1]}")
    clip = write_clip(work_dir / "clip.mp4", *args.clip_size, args.frames)
    warmup_clip = write_clip(work_dir / "warmup.mp4", *args.clip_size, WARMUP_FRAMES)
    runtime.import_keras()
    from pspnet_keras import backend

    net = load_network(h5, args, work_dir)
    frames = decoded_frames(clip)
    windows = frame_windows(net, frames)
    passes_per_crop = 2 if PROTOCOL["flip"] else 1
    passes_per_frame = net.forward_count(*frames[0].shape[:2], **PROTOCOL)
    (work_dir / "pipeline").mkdir()
    stem = work_dir / "pipeline" / "clip"
    measure.progress(PROG, "warm-up: the network at every batch, the pipeline on the short clip")
    warm_up(net, windows, warmup_clip, stem)
    rounds, orders = run_rounds(turn_calls(net, windows, clip, stem, len(frames)), args.rounds)
    outputs = video.output_paths(stem, ".mp4", False)
    network = {
        str(batch): network_summary(rounds, f"network_batch_{batch}", passes_per_crop) for batch in NETWORK_BATCHES
    }
    pipeline = pipeline_summary(rounds, passes_per_frame) | {
        "batch_size": video.CPU_BATCH,
        "output_frames": {kind: video_frames_in(path) for kind, path in outputs.items()},
    }
    machine |= {"date_end": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_end": os.getloadavg()}
    return {
        "benchmark": PROG,
        "model": MODEL,
        "crop_size": net.crop_size,
        "base_size": net.base_size,
        "dry_run": args.dry_run,
        "rounds": args.rounds,
        "weights": f"seeded synthetic (bench/synthetic_caffe.py, seed of {MODEL}), converted by weight_converter.py",
        "framework": backend.framework_version(),
        "ffmpeg": {name: ".".join(map(str, version)) for name, version in av.library_versions.items()},
        "machine": machine,
        "clip": {
            "width": args.clip_size[0], "height": args.clip_size[1], "fps": FRAME_RATE, "frames": args.frames,
            "frames_in_file": video_frames_in(clip), "frames_decoded": len(frames), "codec": CLIP_CODEC,
            "codec_options": CLIP_OPTIONS, "pixel_format": CLIP_PIXEL_FORMAT,
            "audio": f"{AUDIO_CODEC} mono {AUDIO_RATE} Hz",
        },
        "protocol": PROTOCOL,
        "passes_per_crop": passes_per_crop,
        "passes_per_frame": passes_per_frame,
        "orders": orders,
        "network": network,
        "pipeline": pipeline,
        "ratio": ratio_summary(rounds, pipeline, network, passes_per_crop, passes_per_frame),
        "fastest_batch": int(max(network, key=lambda batch: network[batch]["crops_per_s"])),
        "memory": memory,
        "rounds_figures": rounds,
    }


def main(argv=None):
    """Runs the benchmark or reprints a saved one (--from-json); returns the exit status."""
    args = checked_arguments(argv)
    return measure.reprint_or_run(PROG, run_benchmark, args, results_path, report_text)


if __name__ == "__main__":
    sys.exit(main())
