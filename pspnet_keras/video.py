"""Videos segmented frame by frame, with the image protocol, in batches, in constant memory.

PyAV (FFmpeg's libraries, pyav.org) reads any container and codec FFmpeg reads
and writes H.264. Decoding runs in a thread of its own, the network in the
caller's, the resize of each frame's probabilities to the frame in a third
(utils.in_order), and colouring and encoding in a fourth; the queues between
them are bounded, so memory grows with the batch and the frame size, never with
the length of the video.

`segmented_frames` yields each frame with its class ids and their probabilities
(the Python API, segmenter.PSPNet.segment_video); `segment_video` writes the
files pspnet.py writes for a video: the 50/50 blend and the class colours as
H.264 videos with the source's frame timestamps and its sound, and on request
one lossless class-id PNG per frame. Every output is written to a temporary file
or folder beside it and renamed when the video is done.
"""

import io
import os
import queue
import re
import shutil
import tempfile
import threading
import typing
from pathlib import Path

import numpy as np
from PIL import Image

import utils

VIDEO_REQUIREMENTS = "requirements-video.txt"
# Output containers by extension (FFmpeg muxer names); H.264 in yuv420p plays in every player.
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
DEFAULT_EXTENSION = ".mp4"
VIDEO_CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
# x264's constant-quality setting; 18 is "visually lossless" (trac.ffmpeg.org/wiki/Encode/H.264).
VIDEO_OPTIONS = {"crf": "18", "preset": "veryfast"}
# The codec of the sound where the output container cannot hold the source's (Opus in .mov, say).
AUDIO_CODEC = "aac"
OUTPUT_SUFFIXES = {"seg_blended": "_seg_blended{ext}", "seg": "_seg{ext}", "ids": "_ids"}
IDS_NAME = "{:06d}.png"
IDS_PATTERN = re.compile(r"\d{6,}\.png")
# Frames decoded ahead of the network, and frames waiting to be encoded, in batches.
QUEUED_BATCHES = 2
# How long a thread waits on a queue before it looks whether the work was stopped, in seconds.
POLL_S = 0.2
# A video whose last frame ends this many frame durations before its stated duration was cut short.
TRUNCATION_FRAMES = 1.5
NO_FRAMES = "no frame to segment in the time asked for"
# Frames per batch of the network, by device. On a 2-core CPU a batch of 2 crops takes as long as two
# batches of one (bench/README.md, "Video"), and batches of one give each frame the image command's
# result bit for bit. An accelerator runs wider batches in about the time of one.
CPU_BATCH = 1
GPU_BATCH = 8


class VideoError(Exception):
    """A video that cannot be read or written; the message names the file and the problem."""


class Frame(typing.NamedTuple):
    """A decoded frame: its index among the frames read, its timestamp (pts, in the stream's
    `time_base`), its time in seconds from the start of the output, and its uint8 RGB pixels."""

    index: int
    pts: int
    time_base: object
    time: float
    rgb: np.ndarray


class End(typing.NamedTuple):
    """The reader's last item: the frames read, and why the video ended early (None when it did not)."""

    frames: int
    cut_short: typing.Optional[str]


def import_av():
    """PyAV, with FFmpeg's log lines off; VideoError saying what to install when it is missing."""
    try:
        import av
        import av.logging
    except ImportError:
        raise VideoError(f"videos need PyAV, which is not installed: pip install -r {VIDEO_REQUIREMENTS}") from None
    av.logging.set_level(None)
    return av


def is_video(path):
    """Whether `path` is a video: a file Pillow does not read as an image that PyAV opens with a video
    stream, whatever its extension. False when PyAV is not installed."""
    if utils.file_problem(path) is not None:
        return False
    try:
        with Image.open(path):
            return False
    except (OSError, Image.DecompressionBombError):
        pass
    try:
        av = import_av()
    except VideoError:
        return False
    try:
        with av.open(os.fspath(path)) as container:
            return bool(container.streams.video) and not is_picture_demuxer(container.format.name)
    except (av.error.FFmpegError, OSError, ValueError):
        return False


def not_video_problem(path):
    """Why `path` is not a video pspnet.py can segment: it is not readable, PyAV is missing, FFmpeg
    cannot open it, it holds no video stream, or it is a still picture."""
    problem = utils.file_problem(path)
    if problem:
        return problem
    try:
        av = import_av()
    except VideoError as error:
        return str(error)
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                return "holds no video stream"
            if is_picture_demuxer(container.format.name):
                return "is a still picture, not a video"
    except (av.error.FFmpegError, OSError, ValueError) as error:
        return f"cannot open as a video ({ffmpeg_reason(error)})"
    return "is an image; give -o an image extension (.png, .jpg)"


def neither_problem():
    """What a file that is not an image Pillow reads and not a video is: naming PyAV's install when missing."""
    try:
        import_av()
    except VideoError:
        return f"not an image Pillow can read; if it is a video, install PyAV: pip install -r {VIDEO_REQUIREMENTS}"
    return "neither an image Pillow can read nor a video PyAV can open"


def is_picture_demuxer(name):
    """Whether FFmpeg's demuxer `name` reads still pictures (image2, png_pipe, ...), not videos."""
    return name == "image2" or name.endswith("_pipe")


def output_extension(requested, source):
    """The extension of a video's outputs: `requested` (from -o) when given, else the source's when
    it names a container we write, else DEFAULT_EXTENSION; VideoError for one we cannot write."""
    if requested:
        if requested.lower() not in CONTAINER_FORMATS:
            choices = ", ".join(CONTAINER_FORMATS)
            raise VideoError(f"cannot write videos with the extension {requested!r}; use one of {choices}")
        return requested
    return source.suffix if source.suffix.lower() in CONTAINER_FORMATS else DEFAULT_EXTENSION


def output_paths(stem, extension, save_ids):
    """The outputs of one video, by kind, for the output stem and extension ('ids' is a folder)."""
    kinds = [kind for kind in OUTPUT_SUFFIXES if save_ids or kind != "ids"]
    return {kind: Path(f"{stem}{OUTPUT_SUFFIXES[kind].format(ext=extension)}") for kind in kinds}


def device_batch_size():
    """Frames per network batch on the device Keras runs on (CPU_BATCH, GPU_BATCH)."""
    from pspnet_keras import backend

    return GPU_BATCH if backend.gpu_names() else CPU_BATCH


def stream_duration(container, stream):
    """The duration of a video stream in seconds, as the container states it, or None."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    stated = stream.metadata.get("DURATION")  # Matroska's per-stream tag, 'HH:MM:SS.nnnnnnnnn'
    if stated:
        hours, minutes, seconds = stated.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def frame_rate(stream):
    """The frames per second of a video stream (its average rate, else its base rate, else 25)."""
    rate = stream.average_rate or stream.base_rate
    return float(rate) if rate else 25.0


class FrameReader:
    """The frames of a video from `start` seconds on, for `duration` seconds (all when None), decoded in
    a thread of its own into a bounded queue; the sound's packets of the same times go to another.

    A frame that cannot be decoded is skipped and `warn` is called with one line naming its time;
    the frames after it keep their timestamps. A video that ends before its stated duration, or
    whose data stop being readable, ends the frames with End.cut_short saying where.
    Use it as a context manager: leaving it stops the thread.
    """

    def __init__(self, path, start=0.0, duration=None, queued=2, warn=print):
        self.av = import_av()
        self.path = path
        self.start = start
        self.duration = duration
        self.warn = warn
        problem = utils.file_problem(path)
        if problem:
            raise VideoError(f"{path}: {problem}")
        try:
            self.container = self.av.open(os.fspath(path))
        except (self.av.error.FFmpegError, OSError, ValueError) as error:
            raise VideoError(f"{path}: cannot open as a video ({ffmpeg_reason(error)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{path}: holds no video stream")
        self.stream = self.container.streams.video[0]
        self.audio = self.container.streams.audio[0] if self.container.streams.audio else None
        self.rate = frame_rate(self.stream)
        self.stated_duration = stream_duration(self.container, self.stream)
        self.frames = queue.Queue(maxsize=queued)
        self.audio_packets = queue.Queue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.read, name="video reader", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.thread.join()
        self.container.close()
        return False

    def stated_end(self):
        """The time the frames read should reach by the video's stated duration (and `duration`), or None
        when the video states none."""
        if self.stated_duration is None or self.duration is None:
            return self.stated_duration
        return min(self.stated_duration, self.start + self.duration)

    def expected_frames(self):
        """About how many frames will be read (for a progress bar), or None when unknown."""
        end = self.stated_end()
        if end is None and self.duration is not None:
            end = self.start + self.duration
        if end is None:
            return None
        return max(0, round((end - self.start) * self.rate))

    def put(self, item, target):
        """Puts an item in a queue unless the reading was stopped; whether it was put."""
        while not self.stopped.is_set():
            try:
                target.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def read(self):
        """The thread's work: demux and decode, then End (or the exception that stopped it)."""
        try:
            self.put(self.decoded(), self.frames)
        except BaseException as error:  # handed to the consumer, which raises it
            self.put(error, self.frames)

    def seek(self):
        """Moves to the key frame at or before `start`."""
        if self.start > 0:
            self.container.seek(int(self.start / self.stream.time_base), stream=self.stream, backward=True)

    def decoded(self):
        """Decodes the frames in range into the queue, the sound's packets into theirs; returns End.

        Timestamps are kept; with a `start`, frames and sound are moved `start` seconds earlier.
        """
        av = self.av
        self.seek()
        end_time = None if self.duration is None else self.start + self.duration
        streams = [self.stream] + ([self.audio] if self.audio is not None else [])
        count = 0
        last_time = None
        packets = self.container.demux(*streams)
        while not self.stopped.is_set():
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as error:
                return End(count, self.cut_short(last_time, ffmpeg_reason(error)))
            if packet.stream.type == "audio":
                if self.kept_sound(packet, end_time):
                    self.audio_packets.put(packet)
                continue
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                self.warn(f"{self.path}: skipped a frame that cannot be decoded at {packet_time(packet)}")
                continue
            for frame in frames:
                if frame.pts is None or frame.time < self.start:
                    continue
                if end_time is not None and frame.time >= end_time:
                    return End(count, None)
                rgb = upright(frame.to_ndarray(format="rgb24"), frame.rotation)
                pts = frame.pts - round(self.start / frame.time_base)
                item = Frame(count, pts, frame.time_base, float(pts * frame.time_base), rgb)
                if not self.put(item, self.frames):
                    return End(count, None)
                count += 1
                last_time = float(frame.time)
        return End(count, self.cut_short(last_time, None))

    def kept_sound(self, packet, end_time):
        """Whether a sound packet lies between `start` and `end_time`; if so, moves it `start` earlier."""
        if packet.dts is None or packet.pts is None:
            return False
        time = float(packet.pts * packet.time_base)
        if time < self.start or (end_time is not None and time >= end_time):
            return False
        shift = round(self.start / packet.time_base)
        packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
        return True

    def cut_short(self, last_time, reason):
        """Where the video ended early, or None when its frames reached its stated duration."""
        end = self.stated_end()
        reached = self.start if last_time is None else last_time + 1 / self.rate
        if reason is None and (end is None or reached >= end - TRUNCATION_FRAMES / self.rate):
            return None
        stated = f" of {end:.2f} s" if end is not None else ""
        because = f": {reason}" if reason else ""
        return f"the video ends at {reached:.2f} s{stated} (truncated or damaged{because})"

    def __iter__(self):
        """The frames, then End; raises what stopped the reading thread."""
        while True:
            item = self.frames.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, End):
                return


def upright(rgb, rotation):
    """A decoded frame as players show it: turned by the rotation of its display matrix (degrees
    counterclockwise, FFmpeg's av_display_rotation_get), as phones record portrait videos."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def packet_time(packet):
    """A packet's time as 'N.NN s', or 'an unknown time'."""
    if packet.pts is None or packet.time_base is None:
        return "an unknown time"
    return f"{float(packet.pts * packet.time_base):.2f} s"


def ffmpeg_reason(error):
    """FFmpeg's reason in a PyAV error, without the errno and the file name."""
    return getattr(error, "strerror", None) or str(error)


def container_holds(av, container_format, stream):
    """Whether FFmpeg's muxer `container_format` can hold a copy of `stream`'s packets: it writes a
    header for it (into memory)."""
    try:
        with av.open(io.BytesIO(), "w", format=container_format) as probe:
            probe.add_stream_from_template(stream)
            probe.start_encoding()
    except (av.error.FFmpegError, ValueError):
        return False
    return True


def even_sized(rgb):
    """The frame with its last row and column repeated where its height or width is odd: yuv420p
    stores colour at half resolution, and H.264 encoders take even sizes only."""
    height, width = rgb.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return rgb
    return np.pad(rgb, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


class EncodedVideo:
    """One output video in a temporary file: H.264 (yuv420p) frames at the source's frame timestamps,
    with the source's sound copied, or encoded as AAC where the container cannot hold it."""

    def __init__(self, av, temporary, extension, reader, frame_shape):
        self.av = av
        self.container = av.open(temporary, "w", format=CONTAINER_FORMATS[extension.lower()])
        source = reader.stream
        rate = source.average_rate or source.base_rate
        self.video = self.container.add_stream(VIDEO_CODEC, rate=rate, options=dict(VIDEO_OPTIONS))
        height, width = even_sized(np.empty(frame_shape[:2] + (1,), dtype=np.uint8)).shape[:2]
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = PIXEL_FORMAT
        self.video.time_base = source.time_base
        self.video.codec_context.time_base = source.time_base
        self.sound = None
        self.resampler = None
        if reader.audio is not None:
            if container_holds(av, self.container.format.name.split(",")[0], reader.audio):
                self.sound = self.container.add_stream_from_template(reader.audio)
            else:
                self.sound = self.container.add_stream(AUDIO_CODEC, rate=reader.audio.rate)
                self.sound.layout = reader.audio.layout
                self.resampler = av.AudioResampler(format="fltp", layout=reader.audio.layout, rate=reader.audio.rate)

    def write(self, frame, rgb):
        """Encodes one frame's picture at the frame's timestamp."""
        picture = self.av.VideoFrame.from_ndarray(even_sized(rgb), format="rgb24")
        picture.pts, picture.time_base = frame.pts, frame.time_base
        for packet in self.video.encode(picture):
            self.container.mux(packet)

    def write_sound(self, packet, decoded):
        """Copies a sound packet, or encodes its `decoded` frames where the sound is re-encoded."""
        if self.resampler is None:
            packet.stream = self.sound
            self.container.mux(packet)
            return
        for frame in decoded:
            for resampled in self.resampler.resample(frame):
                self.container.mux(self.sound.encode(resampled))

    def close(self):
        """Flushes the encoders and writes the container's index."""
        self.container.mux(self.video.encode())
        if self.resampler is not None:
            self.container.mux(self.sound.encode())
        self.container.close()


class FrameIdNames:
    """The names of the files of a class-id folder ('000000.png', ...), for cli.folder_output_problem."""

    def __contains__(self, name):
        return IDS_PATTERN.fullmatch(name) is not None


class VideoOutputs:
    """The output files of one video, encoded in a thread of its own from a bounded queue of
    (frame, class ids), into temporary files and a temporary folder beside the outputs that
    `commit` renames onto them; leaving it otherwise removes them. `progress` is called with
    1 after each frame written."""

    def __init__(self, outputs, reader, palette, queued, progress):
        self.av = reader.av
        self.outputs = outputs
        self.reader = reader
        self.palette = palette
        self.progress = progress
        self.files = utils.AtomicFiles()
        self.ids_folder = None
        try:
            self.temporaries = {kind: self.files.temporary(outputs[kind]) for kind in ("seg_blended", "seg")}
            if "ids" in outputs:
                self.ids_folder = temporary_folder(outputs["ids"])
        except BaseException:
            self.files.__exit__(None, None, None)
            raise
        self.videos = {}
        self.items = queue.Queue(maxsize=queued)
        self.stopped = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self.work, name="video writer", daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.thread.join()
        self.files.__exit__(*exc_info)
        if self.ids_folder is not None:
            shutil.rmtree(self.ids_folder, ignore_errors=True)
        return False

    def put(self, frame, class_ids):
        """Hands one frame and its class ids to the writing thread (None: no more frames)."""
        item = None if frame is None else (frame, class_ids)
        while self.thread.is_alive():
            try:
                self.items.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue
        self.raise_error()

    def work(self):
        """The thread's work: encode every frame, then the sound left, then close the files. A file
        left open by an error or a stop is closed too (and removed when the outputs are left)."""
        closed = False
        try:
            while not self.stopped.is_set():
                try:
                    item = self.items.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if item is None:
                    self.write_sound()
                    closed = True
                    for encoded in self.videos.values():
                        encoded.close()
                    return
                self.write_frame(*item)
        except Exception as error:  # handed to the main thread by finish or put
            self.error = error
        finally:
            if not closed:
                for encoded in self.videos.values():
                    encoded.container.close()

    def write_frame(self, frame, class_ids):
        """Writes one frame's pictures (and the sound read so far)."""
        if not self.videos:
            self.videos = {
                kind: EncodedVideo(self.av, temporary, self.outputs[kind].suffix, self.reader, frame.rgb.shape)
                for kind, temporary in self.temporaries.items()
            }
        self.write_sound()
        colour = utils.colorize(class_ids, self.palette)
        self.videos["seg_blended"].write(frame, utils.blend(frame.rgb, colour))
        self.videos["seg"].write(frame, colour)
        if self.ids_folder is not None:
            Image.fromarray(class_ids).save(self.ids_folder / IDS_NAME.format(frame.index), format="PNG")
        self.progress(1)

    def write_sound(self):
        """Writes the sound packets read so far into every video."""
        decoder = None
        while self.videos:
            try:
                packet = self.reader.audio_packets.get_nowait()
            except queue.Empty:
                return
            if any(encoded.resampler is not None for encoded in self.videos.values()):
                decoder = decoder or self.reader.audio.codec_context
                decoded = decoder.decode(packet)
            else:
                decoded = None
            for encoded in self.videos.values():
                encoded.write_sound(packet, decoded)

    def raise_error(self):
        """Raises what stopped the writing thread, as utils.OutputError naming the outputs."""
        if self.error is not None:
            reason = ffmpeg_reason(self.error)
            raise utils.OutputError(f"{self.outputs['seg_blended']}: cannot write ({reason})") from self.error

    def finish(self):
        """Waits for the thread to write every frame handed to it and close the files."""
        self.put(None, None)
        self.thread.join()
        self.raise_error()

    def commit(self):
        """Renames the temporary files and folder onto the outputs."""
        self.files.commit()
        if self.ids_folder is not None:
            replace_folder(self.ids_folder, self.outputs["ids"])
            self.ids_folder = None


def temporary_folder(target):
    """A new, empty temporary folder beside the folder `target`, to be renamed onto it."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as error:
        raise utils.OutputError(f"{target}: cannot write ({error.strerror or error})") from None


def replace_folder(folder, target):
    """Renames `folder` onto `target`; an existing `target` (an earlier run's output) is moved aside first
    and removed after."""
    aside = None
    try:
        if os.path.lexists(target):
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, aside / target.name)
        os.replace(folder, target)
    except OSError as error:
        if aside is not None and not os.path.lexists(target):
            os.replace(aside / target.name, target)
        raise utils.OutputError(f"{target}: cannot write ({error.strerror or error})") from None
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    os.chmod(target, 0o777 & ~utils.current_umask())


def network_maps(net, frames, protocol, every, batch_size):
    """(frame, its scale maps, or None for a frame that repeats the last result) for each Frame, in order.

    One frame in `every` is segmented; those go through the network `batch_size` at a time
    (inference.Predictor.image_maps), and the frames between them wait with them.
    """
    waiting = []
    for frame in frames:
        if frame.index % every != 0 and not waiting:
            yield frame, None
            continue
        waiting.append(frame)
        segmented = [frame for frame in waiting if frame.index % every == 0]
        if len(segmented) == batch_size:
            yield from with_maps(net, waiting, protocol, every, batch_size)
            waiting = []
    if waiting:
        yield from with_maps(net, waiting, protocol, every, batch_size)


def with_maps(net, frames, protocol, every, batch_size):
    """(frame, scale maps or None) for frames of which those to segment are predicted in one batch."""
    segmented = [frame for frame in frames if frame.index % every == 0]
    with net.predictor.out_of_memory_as_error(segmented[0].rgb, protocol["sliding"], protocol["multi_scale"]):
        maps = net.predictor.image_maps([frame.rgb for frame in segmented], batch_size=batch_size, **protocol)
    by_index = {frame.index: frame_maps for frame, frame_maps in zip(segmented, maps)}
    for frame in frames:
        yield frame, by_index.get(frame.index)


def segmented_frames(net, reader, protocol, every=1, batch_size=1):
    """(Frame, class ids uint8 (H, W), their probabilities float32 (H, W)) for every frame of a
    FrameReader, in order, as PSPNet.class_map gives them for the frame with `protocol`; a frame
    that is not segmented (`every`) repeats the last result. The frames' probabilities are
    resized to the frame in a thread of their own while the network runs on the next. The
    reader's End is left in `reader.end`.
    """

    last = {}

    def frames():
        for item in reader:
            if isinstance(item, End):
                reader.end = item
                return
            yield item

    def best_classes(item):
        frame, maps = item
        if maps is not None:
            last["result"] = net.predictor.best_classes(maps, *frame.rgb.shape[:2])
        return (frame, *last["result"])

    yield from utils.in_order(best_classes, network_maps(net, frames(), protocol, every, batch_size), threads=1)


def segment_video(net, source, outputs, protocol, every=1, start=0.0, duration=None, batch_size=None,
                  quiet=False, warn=print):
    """Segments the frames of a video into its `outputs` ({kind: path}, output_paths), all or none.

    Returns (End, class pixel counts over the frames written). A progress bar counts the
    frames unless `quiet`; `warn` is called with one line for each frame that could not be
    decoded. Raises VideoError for a video that cannot be read, has no frame in range or
    whose frames do not fit in memory, and utils.OutputError for outputs that cannot be written.
    """
    from tqdm import tqdm

    from pspnet_keras.inference import OutOfMemory

    batch_size = batch_size or device_batch_size()
    queued = QUEUED_BATCHES * batch_size
    counts = np.zeros(net.classes, dtype=np.int64)
    with FrameReader(source, start, duration, queued, warn) as reader, tqdm(
        total=reader.expected_frames(), unit="frame", desc=Path(source).name, leave=False,
        disable=quiet or reader.expected_frames() == 0,
    ) as bar, VideoOutputs(outputs, reader, net.palette, queued, bar.update) as writer:
        try:
            for frame, class_ids, _ in segmented_frames(net, reader, protocol, every, batch_size):
                writer.put(frame, class_ids)
                counts += np.bincount(class_ids.ravel(), minlength=net.classes)
        except OutOfMemory as error:
            raise VideoError(f"{source}: {error}") from None
        if reader.end.frames == 0:
            raise VideoError(f"{source}: {reader.end.cut_short or NO_FRAMES}")
        writer.finish()
        writer.commit()
    return reader.end, counts
