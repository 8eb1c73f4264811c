"""Videos through pspnet.py and PSPNet.segment_video, on short clips the tests make with PyAV.

The clips are coloured shapes moving over a few dozen frames at 320x240, with or without
sound, in .mp4 and .mkv. Each output is decoded and compared with what the image command
gives for the same frame, decoded from the source: the class ids exactly, the colours up to
H.264's loss. Timing is compared with the source's, frame by frame and for the sound.
"""

import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from PIL import Image

from helpers import PROJECT_ROOT
from helpers import error_lines
from helpers import run_main
from pspnet_keras.segmenter import PSPNet

WIDTH, HEIGHT = 320, 240
FRAME_RATE = 24
FRAMES = 24
SAMPLE_RATE = 48000
# H.264's loss on top of yuv420p's (colour at half resolution, which blurs the edges between classes
# by up to 3 grey levels on average with these class maps): a decoded frame is compared with the
# expected one converted to yuv420p and back by FFmpeg's swscale. Mean absolute error per channel in
# grey levels, and the share of pixels more than FAR_LEVELS off. A frame's neighbour is 10-26 levels
# off on average.
MEAN_CODEC_LEVELS = 2.5
FAR_LEVELS = 24
FAR_SHARE = 0.02
INTERRUPT_DEADLINE_S = 5


def moving_shapes(index, width=WIDTH, height=HEIGHT):
    """Frame `index` of the test clips: two coloured boxes moving over a gradient."""
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, np.newaxis]
    columns = np.linspace(0, 255, width, dtype=np.float32)[np.newaxis, :]
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[..., 0] = rows
    frame[..., 1] = columns
    frame[..., 2] = 128
    left = (10 + 6 * index) % (width - 60)
    frame[60:140, left : left + 60] = (250, 40, 30)
    top = (150 - 3 * index) % (height - 50)
    frame[top : top + 50, 200:260] = (30, 210, 70)
    return frame


def make_clip(path, frames=FRAMES, sound="aac", frame_rate=FRAME_RATE, width=WIDTH, height=HEIGHT):
    """Writes a clip of moving_shapes frames (H.264, yuv420p) with a sine tone (`sound`: an audio codec,
    or None for no sound) as long as the video; returns its path."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=frame_rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = None
        if sound is not None:
            audio = container.add_stream(sound, rate=SAMPLE_RATE)
            audio.layout = "mono"
        for index in range(frames):
            picture = av.VideoFrame.from_ndarray(moving_shapes(index, width, height), format="rgb24")
            container.mux(video.encode(picture))
        container.mux(video.encode())
        if audio is not None:
            seconds = np.arange(round(SAMPLE_RATE * frames / frame_rate)) / SAMPLE_RATE
            tone = (0.2 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32)[np.newaxis]
            for first in range(0, tone.shape[1], 960):
                samples = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, first : first + 960]), format="fltp", layout="mono")
                samples.sample_rate = SAMPLE_RATE
                container.mux(audio.encode(samples))
            container.mux(audio.encode())
    return path


def decoded_frames(path):
    """[(time in seconds, uint8 RGB frame)] of a video's first video stream."""
    with av.open(str(path)) as container:
        return [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def sound_seconds(path):
    """The seconds of sound in a file: the end of its last audio packet, or None without sound."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        ends = [float((packet.pts + packet.duration) * packet.time_base)
                for packet in container.demux(stream) if packet.pts is not None]
        return max(ends)


def stream_facts(path):
    """(video codec, pixel format, average frame rate, audio codec or None) of a file."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        return video.codec_context.name, video.codec_context.pix_fmt, video.average_rate, audio


@pytest.fixture(scope="module")
def small_net(small_weights):
    """The PSPNet of small_weights, loaded once for the module."""
    return PSPNet(weights=small_weights)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The module's clips: with AAC sound in .mp4 and .mkv, and without sound in .mp4."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        "mp4": make_clip(folder / "shapes.mp4"),
        "mkv": make_clip(folder / "shapes.mkv"),
        "silent": make_clip(folder / "silent.mp4", sound=None),
    }


def image_command_outputs(tmp_path, weights, frame, name):
    """The class ids and colours `pspnet.py -i` writes for one frame saved as a PNG."""
    source = tmp_path / f"{name}.png"
    Image.fromarray(frame).save(source)
    result = run_main("-w", weights, "-i", source, "-o", tmp_path / "images" / f"{name}.png", "-q")
    assert result.code == 0, result.stderr
    with Image.open(tmp_path / "images" / f"{name}_seg_read.png") as ids, Image.open(tmp_path / "images" / f"{name}_seg.png") as colours:
        return np.asarray(ids), np.asarray(colours)


def assert_within_codec_loss(decoded, expected):
    """Asserts that a decoded H.264 frame is the RGB frame `expected` up to the codec's loss."""
    sampled = av.VideoFrame.from_ndarray(np.ascontiguousarray(expected), format="rgb24").reformat(format="yuv420p")
    error = np.abs(decoded.astype(np.int16) - sampled.to_ndarray(format="rgb24").astype(np.int16))
    assert error.mean() <= MEAN_CODEC_LEVELS, error.mean()
    assert (error.max(axis=-1) > FAR_LEVELS).mean() <= FAR_SHARE


@pytest.mark.slow
def test_every_frame_is_segmented_as_the_image_command_segments_it(tmp_path, small_weights, small_net, clips):
    kind = "mp4"
    source = clips[kind]
    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / f"out.{kind}", "--save-ids", "-q")
    assert result.code == 0, result.stderr
    assert result.stderr == ""

    frames = decoded_frames(source)
    blended = decoded_frames(tmp_path / f"out_seg_blended.{kind}")
    colours = decoded_frames(tmp_path / f"out_seg.{kind}")
    ids_files = sorted((tmp_path / "out_ids").iterdir())
    assert [path.name for path in ids_files] == [f"{index:06d}.png" for index in range(len(frames))]
    assert [time for time, _ in blended] == [time for time, _ in frames]
    assert [time for time, _ in colours] == [time for time, _ in frames]
    palette = np.asarray(small_net.palette)
    for (_, frame), (_, blend), (_, colour), ids_file in zip(frames, blended, colours, ids_files):
        expected_ids, _ = small_net.class_map(frame)
        with Image.open(ids_file) as ids:
            assert ids.mode == "L"
            np.testing.assert_array_equal(np.asarray(ids), expected_ids)
        assert_within_codec_loss(colour, palette[expected_ids])
        assert_within_codec_loss(blend, ((frame.astype(np.uint16) + palette[expected_ids] + 1) // 2).astype(np.uint8))
    for output in (tmp_path / f"out_seg_blended.{kind}", tmp_path / f"out_seg.{kind}"):
        assert stream_facts(output) == ("h264", "yuv420p", FRAME_RATE, "aac")
        assert sound_seconds(output) == pytest.approx(sound_seconds(source), abs=1e-3)
    for index in (0, len(frames) // 2):
        command_ids, command_colours = image_command_outputs(tmp_path, small_weights, frames[index][1], f"frame{index}")
        with Image.open(ids_files[index]) as ids:
            np.testing.assert_array_equal(np.asarray(ids), command_ids)
        assert_within_codec_loss(colours[index][1], command_colours)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mkv", "silent"])
def test_outputs_keep_the_sources_timing_and_sound(tmp_path, small_weights, clips, kind):
    source = clips[kind]
    extension = source.suffix
    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / "out", "-q")
    assert result.code == 0, result.stderr

    source_codec, _, source_rate, source_sound = stream_facts(source)
    for output in (tmp_path / f"out_seg_blended{extension}", tmp_path / f"out_seg{extension}"):
        assert stream_facts(output) == ("h264", "yuv420p", source_rate, source_sound)
        assert [time for time, _ in decoded_frames(output)] == [time for time, _ in decoded_frames(source)]
        if source_sound is None:
            assert sound_seconds(output) is None
        else:
            assert sound_seconds(output) == pytest.approx(sound_seconds(source), abs=1e-3)
    assert source_codec == "h264"


@pytest.mark.slow
def test_sound_the_container_cannot_hold_is_encoded_as_aac(tmp_path, small_weights):
    source = make_clip(tmp_path / "opus.mkv", frames=12, sound="libopus")
    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / "out.mov", "-q")
    assert result.code == 0, result.stderr

    assert stream_facts(tmp_path / "out_seg_blended.mov")[3] == "aac"
    assert sound_seconds(tmp_path / "out_seg_blended.mov") == pytest.approx(sound_seconds(source), abs=0.03)


@pytest.mark.slow
def test_every_start_and_duration_choose_the_frames(tmp_path, small_weights, small_net, clips):
    source = clips["mkv"]
    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / "out.mkv", "--save-ids", "-q",
                      "--every", 3, "--start", 0.25, "--duration", 0.5)
    assert result.code == 0, result.stderr

    kept = [(time, frame) for time, frame in decoded_frames(source) if 0.25 <= time < 0.75]
    written = decoded_frames(tmp_path / "out_seg.mkv")
    assert [time for time, _ in written] == pytest.approx([time - 0.25 for time, _ in kept], abs=1e-9)
    ids_files = sorted((tmp_path / "out_ids").iterdir())
    assert len(ids_files) == len(kept) == 12
    for index, ids_file in enumerate(ids_files):
        expected_ids, _ = small_net.class_map(kept[index - index % 3][1])
        with Image.open(ids_file) as ids:
            np.testing.assert_array_equal(np.asarray(ids), expected_ids)
    assert sound_seconds(tmp_path / "out_seg.mkv") == pytest.approx(0.5, abs=0.05)


@pytest.mark.slow
def test_python_api_yields_each_frames_time_ids_and_confidence(small_net, clips):
    source = clips["mp4"]
    frames = decoded_frames(source)

    results = list(small_net.segment_video(source, duration=0.25))
    batched = list(small_net.segment_video(source, duration=0.25, batch_size=3))

    assert [time for time, _, _ in results] == [time for time, _, _ in batched] == [time for time, _ in frames[:6]]
    for (_, frame), (_, class_ids, confidence), (_, batch_ids, batch_confidence) in zip(frames[:6], results, batched):
        expected_ids, expected_confidence = small_net.class_map(frame)
        np.testing.assert_array_equal(class_ids, expected_ids)
        np.testing.assert_array_equal(confidence, expected_confidence)
        # A batch takes other convolution kernels (test_inference.py): equal but for rounding.
        assert (batch_ids == expected_ids).mean() > 0.999
        np.testing.assert_allclose(batch_confidence, expected_confidence, atol=1e-4)


@pytest.mark.slow
def test_glob_takes_images_and_videos_together(tmp_path, small_weights, clips):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(clips["mp4"], folder / "clip.mp4")
    Image.fromarray(moving_shapes(3)).save(folder / "still.png")
    (folder / "notes.txt").write_text("neither\n")

    result = run_main("-w", small_weights, "-g", folder / "*", "-o", tmp_path / "out", "-q")

    assert result.code == 1
    assert error_lines(result.stderr) == [
        f"pspnet.py: error: {folder / 'notes.txt'}: neither an image Pillow can read nor a video PyAV can open"
    ]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "clip_seg.mp4", "clip_seg_blended.mp4", "still_probs.png", "still_seg.png", "still_seg_blended.png",
        "still_seg_read.png",
    ]


def test_video_without_pyav_names_what_to_install(tmp_path, small_weights, clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)

    result = run_main("-w", small_weights, "-i", clips["mp4"], "-o", tmp_path / "out.mp4")

    assert result.code == 1
    assert result.stderr.splitlines() == [
        f"pspnet.py: error: {clips['mp4']}: videos need PyAV, which is not installed: "
        "pip install -r requirements-video.txt"
    ]
    result = run_main("-w", small_weights, "-g", clips["mp4"], "-o", tmp_path / "out")
    assert result.code == 1
    assert result.stderr.splitlines() == [
        f"pspnet.py: error: {clips['mp4']}: not an image Pillow can read; if it is a video, install PyAV: "
        "pip install -r requirements-video.txt"
    ]
    assert not (tmp_path / "out_seg.mp4").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-o", "{out}/x.png"], "{out}/x.png: cannot write videos with the extension '.png'; use one of .mp4, .m4v, .mov, .mkv"),
        (["--save-probs"], "{source}: is a video; --save-probs writes images' probabilities (use --save-ids)"),
        (["--ray", "local"], "{source}: is a video; --ray segments images only: run videos without --ray"),
    ],
)
def test_options_a_video_cannot_take_are_one_line(tmp_path, small_weights, clips, flags, message):
    out = tmp_path / "out"
    flags = [flag.format(out=out) for flag in flags]
    result = run_main("-w", small_weights, "-i", clips["mp4"], *flags)

    assert result.code == 1
    assert result.stderr.splitlines() == ["pspnet.py: error: " + message.format(out=out, source=clips["mp4"])]
    assert not out.exists()


def test_a_time_range_without_frames_is_one_line(tmp_path, small_weights, clips):
    result = run_main("-w", small_weights, "-i", clips["mp4"], "-o", tmp_path / "out.mp4", "--start", 5)

    assert result.code == 1
    assert result.stderr.splitlines() == [f"pspnet.py: error: {clips['mp4']}: no frame to segment in the time asked for"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_rotated_video_is_segmented_and_written_upright(tmp_path, small_weights, small_net):
    """A phone's portrait video: frames stored landscape with a display matrix turning them 90 degrees
    clockwise. The outputs hold the turned frames, as players show the source."""
    source = tmp_path / "portrait.mp4"
    with av.open(str(source), "w") as container:
        video = container.add_stream("libx264", rate=FRAME_RATE)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.set_display_rotation(-90)
        for index in range(3):
            container.mux(video.encode(av.VideoFrame.from_ndarray(moving_shapes(index), format="rgb24")))
        container.mux(video.encode())

    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / "out.mp4", "--save-ids", "-q")

    assert result.code == 0, result.stderr
    (_, stored), *_ = decoded_frames(source)
    shown = np.rot90(stored, -1)  # 90 degrees clockwise
    expected_ids, _ = small_net.class_map(np.ascontiguousarray(shown))
    with Image.open(tmp_path / "out_ids" / "000000.png") as ids:
        np.testing.assert_array_equal(np.asarray(ids), expected_ids)
    (_, colours), *_ = decoded_frames(tmp_path / "out_seg.mp4")
    assert colours.shape == (WIDTH, HEIGHT, 3)
    assert_within_codec_loss(colours, np.asarray(small_net.palette)[expected_ids])


def corrupted_copy(source, target, packet_number):
    """Copies a video's packets into `target`, replacing the data of its `packet_number`-th video packet
    (counted from 1) by seeded random bytes; returns that packet's time in seconds."""
    rng = np.random.default_rng(0)
    with av.open(str(source)) as reader, av.open(str(target), "w") as writer:
        streams = {stream.index: writer.add_stream_from_template(stream) for stream in reader.streams}
        count = 0
        for packet in reader.demux():
            if packet.dts is None:
                continue
            target_stream = streams[packet.stream.index]
            if packet.stream.type == "video":
                count += 1
                if count == packet_number:
                    junk = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                    junk.pts, junk.dts, junk.time_base = packet.pts, packet.dts, packet.time_base
                    corrupted_time = float(packet.pts * packet.time_base)
                    packet = junk
            packet.stream = target_stream
            writer.mux(packet)
    return corrupted_time


@pytest.mark.slow
def test_a_corrupt_frame_is_skipped_with_one_warning_and_the_timing_kept(tmp_path, small_weights, clips):
    source = tmp_path / "corrupt.mp4"
    corrupted_time = corrupted_copy(clips["mp4"], source, packet_number=12)
    readable = decoded_frames_skipping_errors(source)

    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / "out.mp4", "-q")

    assert result.code == 0
    assert result.stderr.splitlines() == [
        f"pspnet.py: warning: {source}: skipped a frame that cannot be decoded at {corrupted_time:.2f} s"
    ]
    written = [time for time, _ in decoded_frames(tmp_path / "out_seg.mp4")]
    assert written == [time for time, _ in readable]
    assert len(written) == FRAMES - 1
    assert sound_seconds(tmp_path / "out_seg.mp4") == pytest.approx(sound_seconds(clips["mp4"]), abs=1e-3)


def decoded_frames_skipping_errors(path):
    """[(time, frame)] of the frames FFmpeg decodes from a video, leaving out packets it refuses."""
    frames = []
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            try:
                frames.extend((float(frame.time), frame.to_ndarray(format="rgb24")) for frame in packet.decode())
            except av.error.InvalidDataError:
                continue
    return frames


@pytest.mark.slow
def test_a_truncated_video_gets_its_readable_frames_and_one_line(tmp_path, small_weights, clips):
    source = tmp_path / "cut.mkv"
    data = clips["mkv"].read_bytes()
    source.write_bytes(data[: len(data) * 6 // 10])
    readable = decoded_frames(source)
    assert 0 < len(readable) < FRAMES

    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / "out.mkv", "-q")

    assert result.code == 1
    end = readable[-1][0] + 1 / FRAME_RATE
    assert result.stderr.splitlines() == [
        f"pspnet.py: error: {source}: the video ends at {end:.2f} s of {FRAMES / FRAME_RATE:.2f} s "
        f"(truncated or damaged); wrote its {len(readable)} frames before"
    ]
    assert [time for time, _ in decoded_frames(tmp_path / "out_seg.mkv")] == [time for time, _ in readable]


def test_an_mp4_cut_before_its_index_is_one_line(tmp_path, small_weights, clips):
    source = tmp_path / "cut.mp4"
    data = clips["mp4"].read_bytes()
    source.write_bytes(data[: len(data) // 2])

    result = run_main("-w", small_weights, "-i", source, "-o", tmp_path / "out.mp4", "-q")

    assert result.code == 1
    assert result.stderr.splitlines() == [
        f"pspnet.py: error: {source}: cannot open as a video (Invalid data found when processing input)"
    ]
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.slow
def test_a_rerun_replaces_its_own_outputs_but_never_a_folder_of_other_files(tmp_path, small_weights, clips):
    out = tmp_path / "out.mp4"
    assert run_main("-w", small_weights, "-i", clips["silent"], "-o", out, "--save-ids", "-q", "--duration", 0.2).code == 0
    (tmp_path / "out_ids" / "000000.png").write_bytes(b"stale")
    assert run_main("-w", small_weights, "-i", clips["silent"], "-o", out, "--save-ids", "-q", "--duration", 0.2).code == 0
    with Image.open(tmp_path / "out_ids" / "000000.png") as ids:
        assert ids.mode == "L"

    (tmp_path / "out_ids" / "notes.txt").write_text("mine\n")
    result = run_main("-w", small_weights, "-i", clips["silent"], "-o", out, "--save-ids", "-q")
    assert result.code == 1
    assert result.stderr.splitlines() == [
        f"pspnet.py: error: {tmp_path / 'out_ids'}: holds files that it would lose (notes.txt); refusing to replace "
        "it; choose another -o"
    ]
    assert (tmp_path / "out_ids" / "notes.txt").read_text() == "mine\n"


@pytest.mark.slow
def test_a_terminated_video_leaves_no_output(tmp_path, small_weights):
    """SIGTERM in the middle of a video (Ctrl-C takes the same way out, as KeyboardInterrupt)."""
    signum, code, said = signal.SIGTERM, 143, "terminated"
    source = make_clip(tmp_path / "long.mp4", frames=150, sound="aac")
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "pspnet.py"), "-w", str(small_weights), "-i", str(source),
         "-o", str(out / "long.mp4"), "--save-ids"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_frames(out, process)
        process.send_signal(signum)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        stopped_after = time.monotonic() - sent
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stderr.splitlines()[-1].endswith(f"pspnet.py: {said}")
    assert stopped_after < INTERRUPT_DEADLINE_S
    assert list(out.iterdir()) == []


def wait_for_frames(out, process, frames=5, timeout_s=120):
    """Waits until the running command has written `frames` class-id PNGs into its temporary folder."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        folders = [path for path in out.glob(".long_ids.*.tmp")] if out.exists() else []
        if folders and len(list(folders[0].iterdir())) >= frames:
            return
        time.sleep(0.1)
    raise AssertionError("the command wrote no frames in time")
