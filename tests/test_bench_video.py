"""bench/video.py: the clips it makes, and its dry run end to end (network, pipeline and pspnet.py's memory)."""

import contextlib
import io
import json
import math
import subprocess
import sys

import av
import numpy as np
import pytest

from bench import measure
from bench import video

# The dry run converts the synthetic weights, starts pspnet.py twice and times crop-41 networks: about
# a minute on 2 shared cores.
DRY_RUN_TIMEOUT_S = 600
# Whatever pspnet.py imports (Keras and its backend) holds more than this; the wrapper that measures it
# is a bare Python of about 10 MiB, and a peak of that size would be the wrapper's own.
MIN_PSPNET_PEAK_MIB = 200
CLIP_WIDTH, CLIP_HEIGHT, CLIP_FRAMES = 160, 120, 5
# AAC encodes 1024 samples per frame: the sound decoded ends within one frame of the pictures.
AAC_FRAME_SAMPLES = 1024
MIN_TONE_CORRELATION = 0.99


def psnr(picture, reference):
    """The peak signal-to-noise ratio of a uint8 picture against a reference, in dB."""
    error = np.mean((picture.astype(np.float64) - reference) ** 2)
    return 10 * np.log10(255**2 / error)


def test_a_clip_holds_its_moving_frames_in_order_and_its_sound(tmp_path):
    path = video.write_clip(tmp_path / "clip.mp4", CLIP_WIDTH, CLIP_HEIGHT, CLIP_FRAMES)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.format.name) == ("h264", video.CLIP_PIXEL_FORMAT)
        assert (stream.width, stream.height, stream.average_rate) == (CLIP_WIDTH, CLIP_HEIGHT, video.FRAME_RATE)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with av.open(str(path)) as container:
        assert (container.streams.audio[0].codec_context.name, container.streams.audio[0].rate) == ("aac", 48000)
        sound = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)])
    assert len(frames) == video.video_frames_in(path) == CLIP_FRAMES
    drawn = [video.clip_frame(index, CLIP_WIDTH, CLIP_HEIGHT) for index in range(CLIP_FRAMES)]
    for index, frame in enumerate(frames):
        assert np.argmax([psnr(frame, reference) for reference in drawn]) == index
    duration_samples = CLIP_FRAMES * video.AUDIO_RATE // video.FRAME_RATE
    assert abs(len(sound) - duration_samples) < AAC_FRAME_SAMPLES
    tone = video.tone(0, duration_samples)
    assert np.corrcoef(sound[:duration_samples], tone)[0, 1] > MIN_TONE_CORRELATION


def test_frames_that_batch_2_would_pad_are_refused():
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as stderr:
        video.main(["--frames", "5"])
    assert exit_info.value.code == 2
    assert "--frames must be a positive multiple of 2" in stderr.getvalue()


@pytest.mark.slow
def test_a_dry_run_measures_the_network_the_pipeline_and_memory(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.video", "--dry-run", "--results", str(tmp_path)],
        cwd=video.PROJECT_ROOT, capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.iterdir()
    assert path.name == f"video_pspnet50_ade20k_{measure.cpu_facts()['kind']}_dry_run.json"
    results = json.loads(path.read_text())
    assert (results["crop_size"], results["base_size"], results["dry_run"], results["rounds"]) == (41, 48, True, 1)
    assert results["machine"]["simd"] == measure.cpu_facts()["simd"]
    assert results["machine"]["cpu_kind"] == measure.cpu_facts()["kind"] and results["machine"]["cores"] >= 1
    clip = results["clip"]
    assert (clip["width"], clip["height"], clip["fps"], clip["frames"]) == (320, 240, 24, 6)
    assert clip["frames_in_file"] == clip["frames_decoded"] == 6
    assert results["passes_per_crop"] == results["passes_per_frame"] == 2
    assert results["orders"] == [["network_batch_1", "network_batch_2", "pipeline"]]
    (figures,) = results["rounds_figures"]
    for batch_size, summary in results["network"].items():
        turn = figures[f"network_batch_{batch_size}"]
        assert turn["crops"] == 6 and turn["wall_s"] > 0 and turn["cpu_s"] > 0
        assert summary["p50_s"] == summary["p90_s"] == turn["wall_s"] / 6
        assert math.isclose(summary["passes_per_s"], 2 * 6 / turn["wall_s"])
    assert set(results["network"]) == {"1", "2"}
    pipeline = results["pipeline"]
    assert pipeline["batch_size"] == 1
    assert pipeline["frames_per_round"] == [figures["pipeline"]["frames"]] == [6]
    assert pipeline["output_frames"] == {"seg_blended": 6, "seg": 6}
    assert math.isclose(pipeline["frames_per_s"], 6 / figures["pipeline"]["wall_s"])
    ratio = results["ratio"]
    assert math.isfinite(ratio["pipeline_over_network"]) and ratio["pipeline_over_network"] > 0
    network_s_per_crop = figures["network_batch_1"]["wall_s"] / 6
    pipeline_s_per_frame = figures["pipeline"]["wall_s"] / 6
    assert math.isclose(ratio["pipeline_over_network"], network_s_per_crop / pipeline_s_per_frame)
    assert ratio["per_round"] == [pytest.approx(ratio["pipeline_over_network"])]
    assert (ratio["goal"], ratio["met"]) == (0.95, ratio["pipeline_over_network"] >= 0.95)
    fastest = max(results["network"], key=lambda batch_size: results["network"][batch_size]["crops_per_s"])
    assert results["fastest_batch"] == int(fastest)
    memory = results["memory"]
    assert (memory["model"], memory["every"]) == ({"crop_size": 137, "base_size": 160}, 12)
    assert [run["seconds"] for run in memory["runs"]] == [2, 4]
    for run in memory["runs"]:
        assert run["frames"] == run["output_frames"] == run["seconds"] * 24
        assert run["segmented_frames"] == run["seconds"] * 2
        assert MIN_PSPNET_PEAK_MIB < run["peak_rss_mib"] < math.inf and run["wall_s"] > 0
    assert memory["growth_mib"] == memory["runs"][1]["peak_rss_mib"] - memory["runs"][0]["peak_rss_mib"]
    reprinted = io.StringIO()
    with contextlib.redirect_stdout(reprinted):
        assert video.main(["--from-json", str(path)]) == 0
    assert done.stdout == reprinted.getvalue() == video.report_text(results) + "\n"
