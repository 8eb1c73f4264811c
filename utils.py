"""Image input/output, visualisation and file writing for PSPNet.

Reads image files into uint8 RGB arrays, turns class-id maps into palette
colours, blends them with the input image, renders max-probability maps as gray
levels, summarises which classes a map contains, and writes every file the
project writes atomically (a temporary file beside the target, renamed into
place). The class names and palettes of the models are in `pspnet_keras/models.py` and
`pspnet_keras/palettes.py`.
"""

import collections
import errno
import json
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import ImageOps

# Pillow modes holding 16-bit samples: 16-bit grayscale PNG and TIFF open as
# "I;16*", 16-bit PGM as "I".
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# Pillow save options per format. JPEG: high quality and no chroma
# subsampling, so that palette colours keep their edges. PNG: zlib level 1,
# three times faster than Pillow's 6 on a photograph (bench/README.md).
SAVE_OPTIONS = {"JPEG": {"quality": 95, "subsampling": 0}, "PNG": {"compress_level": 1}}


class FileError(ValueError):
    """A file that cannot be read or written; the message is one line naming the file and the problem."""


class ImageError(FileError):
    """An image file that cannot be read or written.

    The message is one line naming the file and the problem.
    """


class NotAnImage(ImageError):
    """A file that Pillow does not identify as an image of any format it reads."""


class OutputError(ImageError):
    """An output file that cannot be written; the message names the file and the reason."""


def file_problem(path, replace=False, what="file"):
    """Why `path` cannot be read, or with `replace` be replaced by a new file; None when it can.

    Checked with stat before anything opens the path, so that a FIFO never blocks and
    a device is never read or replaced. A file to read must be a readable regular
    file (`what` names it when missing: "no such weights file"); a file to replace
    may be missing, but an existing directory, device, FIFO or socket is never
    replaced, and a path whose directory cannot exist is left to that directory's check.
    """
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
    except (FileNotFoundError, NotADirectoryError) as error:
        if replace:
            return None
        if isinstance(error, NotADirectoryError):
            return f"cannot read ({error.strerror})"
        return "dangling symbolic link" if os.path.islink(name) else f"no such {what}"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot {'write' if replace else 'read'} ({error.strerror or error})"
    if stat.S_ISDIR(mode):
        return "is a directory" if replace else f"is a directory, not a {what}"
    if not stat.S_ISREG(mode):
        if replace:
            return "exists and is not a regular file; refusing to replace it"
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
        return f"is {kind}, not a regular file"
    if not replace and not os.access(name, os.R_OK):
        return "cannot read (permission denied)"
    return None


def read_small_file(path, max_bytes, what):
    """The bytes of the readable regular file at `path`, which may hold at most `max_bytes` (nothing
    beyond them is read): a description, a record or a list, which no real one makes larger.

    Raises FileError naming the file and what stops it being read: file_problem's reason (a
    FIFO is never opened), "larger than N KiB, too large for `what`", or the read's error.
    """
    name = os.fspath(path)
    problem = file_problem(name)
    if problem:
        raise FileError(f"{name}: {problem}")
    try:
        with open(name, "rb") as file:
            content = file.read(max_bytes + 1)
    except OSError as error:
        raise FileError(f"{name}: cannot read ({error.strerror or error})") from None
    if len(content) > max_bytes:
        raise FileError(f"{name}: larger than {max_bytes // 1024} KiB, too large for {what}")
    return content


def read_image(path):
    """Reads an image file as a uint8 (H, W, 3) RGB array.

    Reads anything Pillow reads (the first frame of multi-frame files) and
    applies the EXIF orientation. Grayscale, bilevel and palette images are
    repeated to three channels; an alpha channel is dropped, not composited;
    CMYK, YCbCr, LAB and HSV go through Pillow's conversion to RGB.
    16-bit samples keep their high byte (value >> 8), which is what Pillow
    itself does with 16-bit RGB PNG and TIFF files; 32-bit integer samples are
    clipped to 0..65535 and then treated as 16-bit. 32-bit float samples go
    through Pillow's conversion: taken on the 0..255 scale, clipped, fraction
    truncated.

    Raises ImageError, naming the file, for anything but a readable regular
    file (missing, a directory, a FIFO, a device, a symbolic-link loop), an
    empty file, a file Pillow cannot identify as an image (Pillow refuses
    images of zero pixels the same way), an image above Pillow's
    decompression-bomb limit, and truncated or corrupt image data (the whole
    image is decoded here, so truncation is found here).
    """
    name = os.fspath(path)
    problem = file_problem(name)
    if problem:
        raise ImageError(f"{name}: {problem}")
    try:
        image = Image.open(name)
    except Image.UnidentifiedImageError:
        if os.path.getsize(name) == 0:
            raise ImageError(f"{name}: empty file") from None
        raise NotAnImage(f"{name}: not an image Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name}: image too large ({error})") from None
    except OSError as error:
        raise ImageError(
            f"{name}: cannot open ({error.strerror or error})"
        ) from None
    with image:
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return _rgb_array(image)
        except MemoryError:
            raise ImageError(f"{name}: not enough memory to decode the image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageError(
                f"{name}: truncated or corrupt image data ({error})"
            ) from None


def _rgb_array(image):
    """Returns the pixels of a loaded Pillow image as uint8 (H, W, 3) RGB."""
    if image.mode in SIXTEEN_BIT_MODES:
        samples = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        gray = (samples >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    return np.array(image.convert("RGB"))


def _checked_class_ids(class_ids, classes):
    """Returns class ids as an integer array, after checking that every id
    lies in 0..classes - 1."""
    ids = np.asarray(class_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"class ids must be integers, not {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= classes):
        raise ValueError(
            f"class ids lie in 0..{classes - 1}; "
            f"found {ids.min()}..{ids.max()}"
        )
    return ids


def colorize(class_ids, palette):
    """Returns the exact palette colour of every class id: uint8 (..., 3)
    for class ids of shape (...) and a (classes, 3) palette."""
    colours = np.asarray(palette, dtype=np.uint8)
    return colours[_checked_class_ids(class_ids, len(colours))]


def blend(image, colour):
    """Returns the 50/50 mix of two uint8 images of equal shape, halves
    rounded up: (image + colour + 1) // 2, without any stretching."""
    for array in (image, colour):
        if array.dtype != np.uint8:
            raise ValueError(f"blend takes uint8 images, not {array.dtype}")
    if image.shape != colour.shape:
        raise ValueError(
            f"blend takes images of equal shape, not {image.shape} "
            f"and {colour.shape}"
        )
    total = image.astype(np.uint16) + colour.astype(np.uint16) + 1
    return (total // 2).astype(np.uint8)


def probability_image(max_prob):
    """Returns probabilities as uint8 gray levels: p * 255 rounded (halves to
    even), clipped to 0..255, never stretched."""
    probabilities = np.asarray(max_prob, dtype=np.float64)
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("probabilities must be finite numbers")
    levels = np.rint(probabilities * 255.0)
    return np.clip(levels, 0, 255).astype(np.uint8)


def class_summary(class_ids, class_names, top=None):
    """Returns (class id, class name, pixel share) of every class present in
    a class-id map, largest share first, ties by class id; only the first
    `top` of them when `top` is given."""
    ids = _checked_class_ids(class_ids, len(class_names)).ravel().astype(np.intp)
    return class_shares(np.bincount(ids, minlength=len(class_names)), class_names, top)


def class_shares(counts, class_names, top=None):
    """Returns (class id, class name, pixel share) of every class with pixels
    among `counts` (pixels of each class), largest share first, ties by class
    id; only the first `top` of them when `top` is given."""
    if top is not None and top < 0:
        raise ValueError(f"top must be None or at least 0, not {top}")
    counts = np.asarray(counts)
    total = counts.sum()
    present = np.flatnonzero(counts)
    by_share = present[np.argsort(-counts[present], kind="stable")]
    return [
        (int(class_id), class_names[class_id], float(counts[class_id] / total))
        for class_id in by_share[:top]
    ]


def current_umask():
    """The process umask, for giving new files the permissions open() would."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFiles:
    """Output files written together: all of them or none.

    `temporary(path)` gives a new temporary file beside `path` to write;
    `commit()` renames every temporary file onto its target. Leaving the
    `with` block without a commit (an error, Ctrl-C, SIGTERM) removes the
    temporary files, so no target is ever half written. Files get the
    permissions the umask gives, as open() would. Failures raise OutputError
    naming the target and the reason.
    """

    def __init__(self):
        self.temporaries = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for temporary in self.temporaries.values():
            Path(temporary).unlink(missing_ok=True)
        self.temporaries = {}
        return False

    def temporary(self, path):
        """A new, empty temporary file for the target `path` (its directory is created)."""
        target = Path(path)
        problem = file_problem(target, replace=True)
        if problem:
            raise OutputError(f"{target}: {problem}")
        try:
            if target.parent.exists() and not target.parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            target.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
            )
            os.close(descriptor)
            self.temporaries[target] = temporary
            os.chmod(temporary, 0o666 & ~current_umask())
        except OSError as error:
            raise OutputError(f"{target}: cannot write ({error.strerror or error})") from None
        return temporary

    def write(self, path, write):
        """Calls write(temporary path) for the target `path`; OSError becomes OutputError."""
        temporary = self.temporary(path)
        try:
            write(temporary)
        except OSError as error:
            raise OutputError(f"{path}: cannot write ({error.strerror or error})") from None

    def commit(self):
        """Renames every temporary file onto its target."""
        for target, temporary in list(self.temporaries.items()):
            try:
                os.replace(temporary, target)
            except OSError as error:
                raise OutputError(f"{target}: cannot write ({error.strerror or error})") from None
            del self.temporaries[target]


def write_atomic(path, write):
    """Writes one file: write(temporary path) fills a temporary file beside
    `path`, which is then renamed to `path`. See AtomicFiles."""
    with AtomicFiles() as files:
        files.write(path, write)
        files.commit()


def image_format_of(path):
    """The Pillow format that writes files with the extension of `path`;
    ImageError naming the file when there is none."""
    name = os.fspath(path)
    extension = Path(name).suffix.lower()
    if not extension:
        raise ImageError(f"{name}: no file extension to tell the image format")
    image_format = Image.registered_extensions().get(extension)
    if image_format not in Image.SAVE:
        raise ImageError(
            f"{name}: no image format Pillow can write has the extension "
            f"{extension!r}"
        )
    return image_format


def image_writer(path, array):
    """A write(temporary path) callback saving `array` (anything
    Image.fromarray takes) in the format of the extension of `path`.

    JPEG is written at quality 95 without chroma subsampling. Raises
    ImageError, naming the file, for an extension Pillow cannot write and for
    an array that format cannot store.
    """
    name = os.fspath(path)
    image_format = image_format_of(name)
    try:
        image = Image.fromarray(np.asarray(array))
    except TypeError as error:
        raise ImageError(f"{name}: cannot make an image ({error})") from None

    def save(temporary):
        try:
            image.save(
                temporary, format=image_format, **SAVE_OPTIONS.get(image_format, {})
            )
        except (KeyError, ValueError) as error:
            raise ImageError(f"{name}: cannot write ({error})") from None
        except OSError as error:
            if error.errno is None:
                raise ImageError(f"{name}: cannot write ({error})") from None
            raise

    return save


def json_writer(data):
    """A write(temporary path) callback saving `data` as indented JSON."""

    def save(temporary):
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.write("\n")

    return save


def write_image_atomic(path, array):
    """Writes an array as an image file in the format of its extension,
    atomically (see image_writer and AtomicFiles)."""
    write_atomic(path, image_writer(path, array))


def write_json_atomic(path, data):
    """Writes `data` as JSON, atomically."""
    write_atomic(path, json_writer(data))


def in_order(function, items, threads):
    """function(item) for each item, in order, computed by `threads` threads.

    At most two results per thread wait to be taken, so a slow consumer does not
    make them pile up.
    """
    pool = ThreadPoolExecutor(threads)
    try:
        waiting = collections.deque()
        for item in items:
            waiting.append(pool.submit(function, item))
            if len(waiting) >= 2 * threads:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)
