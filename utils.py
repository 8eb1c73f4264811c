"""Image input/output and visualisation helpers for PSPNet.

Reads image files into uint8 RGB arrays, turns class-id maps into palette
colours, blends them with the input image, renders max-probability maps as gray
levels, summarises which classes a map contains, and writes output files
atomically. The class names and palettes of the three datasets are in
`palettes.py`.
"""

import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import ImageOps

from palettes import ADE20K_CLASSES
from palettes import CITYSCAPES_CLASSES
from palettes import VOC2012_CLASSES

DATASETS = ("ade20k", "voc2012", "cityscapes")
DATASET_CLASSES = {
    "ade20k": ADE20K_CLASSES,
    "voc2012": VOC2012_CLASSES,
    "cityscapes": CITYSCAPES_CLASSES,
}

# Pillow modes holding 16-bit samples: 16-bit grayscale PNG and TIFF open as
# "I;16*", 16-bit PGM as "I".
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# Pillow save options per format. JPEG: high quality and no chroma
# subsampling, so that palette colours keep their edges. PNG: zlib level 1,
# three times faster than Pillow's 6 on a photograph (bench/README.md).
SAVE_OPTIONS = {"JPEG": {"quality": 95, "subsampling": 0}, "PNG": {"compress_level": 1}}


class ImageError(ValueError):
    """An image file that cannot be read or written.

    The message is one line naming the file and the problem.
    """


def _dataset_classes(dataset):
    """Returns the (name, colour) table of a dataset name."""
    if dataset not in DATASET_CLASSES:
        raise ValueError(
            f"unknown dataset {dataset!r}; expected one of "
            f"{', '.join(DATASETS)}"
        )
    return DATASET_CLASSES[dataset]


def palette(dataset):
    """Returns the colours of a dataset's classes: uint8 (classes, 3) RGB,
    row = 0-based class id."""
    return np.array(
        [colour for _, colour in _dataset_classes(dataset)], dtype=np.uint8
    )


def class_names(dataset):
    """Returns the names of a dataset's classes, indexed by 0-based class id."""
    return tuple(name for name, _ in _dataset_classes(dataset))


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

    Raises ImageError, naming the file, for a missing file, a directory, an
    empty file, a file Pillow cannot identify as an image (Pillow refuses
    images of zero pixels the same way), an image above Pillow's
    decompression-bomb limit, and truncated or corrupt image data (the whole
    image is decoded here, so truncation is found here).
    """
    name = os.fspath(path)
    try:
        image = Image.open(name)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image file") from None
    except Image.UnidentifiedImageError:
        if os.path.getsize(name) == 0:
            raise ImageError(f"{name}: empty file") from None
        raise ImageError(f"{name}: not an image Pillow can read") from None
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


def _checked_class_ids(class_ids, dataset):
    """Returns class ids as an integer array, after checking that every id
    names a class of the dataset."""
    ids = np.asarray(class_ids)
    classes = len(_dataset_classes(dataset))
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"class ids must be integers, not {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= classes):
        raise ValueError(
            f"class ids of {dataset} lie in 0..{classes - 1}; "
            f"found {ids.min()}..{ids.max()}"
        )
    return ids


def colorize(class_ids, dataset):
    """Returns the exact palette colour of every class id: uint8 (..., 3)
    for class ids of shape (...)."""
    return palette(dataset)[_checked_class_ids(class_ids, dataset)]


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


def class_summary(class_ids, dataset, top=None):
    """Returns (class id, class name, pixel share) of every class present in
    a class-id map, largest share first, ties by class id; only the first
    `top` of them when `top` is given."""
    if top is not None and top < 0:
        raise ValueError(f"top must be None or at least 0, not {top}")
    ids = _checked_class_ids(class_ids, dataset).ravel().astype(np.intp)
    names = class_names(dataset)
    counts = np.bincount(ids, minlength=len(names))
    present = np.flatnonzero(counts)
    by_share = present[np.argsort(-counts[present], kind="stable")]
    return [
        (int(class_id), names[class_id], float(counts[class_id] / ids.size))
        for class_id in by_share[:top]
    ]


def _write_atomic(path, write):
    """Calls write(file) on a new temporary file in the directory of `path`
    (created if missing), then renames it to `path`; removes the temporary
    file if anything fails."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    file = open(temporary, "xb")
    try:
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_image_atomic(path, array):
    """Writes an array (anything Image.fromarray takes, e.g. uint8 (H, W) or
    (H, W, 3)) as an image file in the format of its extension.

    JPEG is written at quality 95 without chroma subsampling. Missing parent
    directories are created; `path` is either replaced by the complete new
    image or left untouched. Raises ImageError, naming the file, for an
    extension Pillow cannot write and for an array Pillow cannot write in
    that format; filesystem errors propagate as OSError.
    """
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
    try:
        image = Image.fromarray(np.asarray(array))
    except TypeError as error:
        raise ImageError(f"{name}: cannot make an image ({error})") from None

    def save(file):
        try:
            image.save(
                file, format=image_format, **SAVE_OPTIONS.get(image_format, {})
            )
        except (OSError, ValueError) as error:
            raise ImageError(f"{name}: cannot write ({error})") from None

    _write_atomic(name, save)


def write_npy_atomic(path, array):
    """Writes an array as a .npy file (no pickled objects), atomically like
    write_image_atomic."""
    _write_atomic(
        path, lambda file: np.save(file, np.asarray(array), allow_pickle=False)
    )
