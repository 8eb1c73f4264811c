"""The datasets PSPNet is evaluated and trained on, as lists of (image, label) samples.

Four layouts of a dataset root:

- `ade20k`: ADEChallengeData2016/images/{validation,training}/*.jpg with
  annotations/<same folder>/<stem>.png, label value k + 1 for class k and 0 for
  unlabelled; the root may also be ADEChallengeData2016 itself.
- `cityscapes`: leftImg8bit/<split>/<city>/<prefix>_leftImg8bit.png with
  gtFine/<split>/<city>/<prefix>_gtFine_labelTrainIds.png (trainIds, 255
  unlabelled), or <prefix>_gtFine_labelIds.png where no trainId file exists
  (labelIds, mapped to trainIds as cityscapesScripts' labels.py does).
- `voc2012`: ImageSets/Segmentation/<split>.txt naming JPEGImages/<name>.jpg and
  SegmentationClass/<name>.png (class ids, 255 unlabelled), at the root, at
  root/VOC2012 or at root/VOCdevkit/VOC2012.
- `folders`, for a user's own data: images/<split>/<name>.<ext> in any format
  Pillow reads, labels/<split>/<name>.png (8-bit class ids, 255 unlabelled),
  classes.txt (one class name per line) and optionally palette.txt (one `R G B`
  line per class; without it the PASCAL VOC colormap). Hidden files are not
  samples.

A VOC list naming an image twice counts it once (Dataset.samples says so through
its `warn`). The text files of a root are read only up to a size fitting what they
hold, and a label only when its pixels fit Pillow's limit and this machine's memory.

`read_label` gives a label file as 0-based class ids with IGNORE_LABEL where
unlabelled; values a layout does not define count as unlabelled and are returned
so that the caller can say so.
"""

import dataclasses
import errno
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

import utils
from pspnet_keras import runtime
from pspnet_keras.models import MAX_CLASSES
from pspnet_keras.palettes import ADE20K_CLASSES
from pspnet_keras.palettes import CITYSCAPES_CLASSES
from pspnet_keras.palettes import VOC2012_CLASSES
from pspnet_keras.palettes import bit_interleaved_colormap

IGNORE_LABEL = 255
DATASET_NAMES = ("ade20k", "cityscapes", "voc2012", "folders")
DATASET_TITLES = {
    "ade20k": "ADE20K",
    "cityscapes": "Cityscapes",
    "voc2012": "PASCAL VOC 2012",
    "folders": "a folders-layout dataset",
}
# (name, colour) tables of the benchmarks the released models were trained on.
BENCHMARK_CLASSES = {"ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "voc2012": VOC2012_CLASSES}

ADE20K_SPLIT_FOLDERS = {"val": "validation", "train": "training"}
ADE20K_UNLABELLED = 0

# cityscapesScripts labels.py: labelId -> trainId of the 19 evaluated classes;
# every other labelId (0 .. 33) is ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_LABEL_IDS = range(34)

FOLDERS_CLASSES_NAME = "classes.txt"
FOLDERS_PALETTE_NAME = "palette.txt"
FOLDERS_LABEL_SUFFIX = ".png"
PALETTE_LINE = re.compile(r"\s*([0-9]{1,3})\s+([0-9]{1,3})\s+([0-9]{1,3})\s*")
LISTED_VALUES = 10
# classes.txt and palette.txt hold at most MAX_CLASSES short lines; a larger file is not one.
MAX_CLASS_FILE_BYTES = 1 << 20
# A VOC image list: VOC 2012's train list is 18 KiB; 8 MiB names some 700,000 images.
MAX_IMAGE_LIST_BYTES = 8 << 20
# Bytes of memory per label pixel while a label is read and counted: the 8-bit values, their class
# ids, numpy's 64-bit copies in bincount, and the labelled mask and 64-bit pairs of metrics.confusion_matrix.
LABEL_BYTES_PER_PIXEL = 40


class DataRootError(Exception):
    """A dataset root that does not hold the expected layout; the message says what was expected."""


class SampleError(Exception):
    """An image or label that cannot be used: `path` names the file, `problem` says why."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclasses.dataclass(frozen=True, eq=False)
class LabelCoding:
    """How a layout stores class ids in 8-bit label files.

    `table[value]` is the class id of a label value, IGNORE_LABEL where unlabelled;
    `defined[value]` says whether the layout defines the value at all (as a class
    or as unlabelled).
    """

    table: np.ndarray
    defined: np.ndarray

    def defined_values(self):
        """The values the layout defines, as ranges: '0-150', '0-20, 255'."""
        values = {int(value) for value in np.flatnonzero(self.defined)}
        starts = sorted(value for value in values if value - 1 not in values)
        ends = sorted(value for value in values if value + 1 not in values)
        return ", ".join(str(s) if s == e else f"{s}-{e}" for s, e in zip(starts, ends))


def label_coding(class_values, unlabelled_values):
    """The LabelCoding where class i is stored as class_values[i] and unlabelled pixels as unlabelled_values."""
    table = np.full(256, IGNORE_LABEL, np.uint8)
    table[list(class_values)] = np.arange(len(class_values))
    defined = np.zeros(256, bool)
    defined[list(class_values)] = True
    defined[list(unlabelled_values)] = True
    return LabelCoding(table, defined)


ADE20K_CODING = label_coding(range(1, len(ADE20K_CLASSES) + 1), [ADE20K_UNLABELLED])
VOC2012_CODING = label_coding(range(len(VOC2012_CLASSES)), [IGNORE_LABEL])
CITYSCAPES_TRAIN_ID_CODING = label_coding(range(len(CITYSCAPES_CLASSES)), [IGNORE_LABEL])
CITYSCAPES_LABEL_ID_CODING = label_coding(
    sorted(CITYSCAPES_TRAIN_IDS, key=CITYSCAPES_TRAIN_IDS.get),
    [label_id for label_id in CITYSCAPES_LABEL_IDS if label_id not in CITYSCAPES_TRAIN_IDS],
)


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One image of a dataset, its label file, and how that file stores class ids."""

    image: Path
    label: Path
    coding: LabelCoding


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset found at `root` in the layout `name` (DATASET_NAMES), with its classes' names and colours."""

    name: str
    root: Path
    class_names: tuple
    palette: tuple

    @property
    def classes(self):
        """The number of classes."""
        return len(self.class_names)

    @property
    def title(self):
        """The dataset as messages name it."""
        return DATASET_TITLES[self.name]

    @property
    def class_files(self):
        """The files of the root that describe the classes (the folders layout's classes.txt and palette.txt)."""
        if self.name != "folders":
            return ()
        return (self.root / FOLDERS_CLASSES_NAME, self.root / FOLDERS_PALETTE_NAME)

    def samples(self, split, warn=None):
        """The samples of `split` ('val', 'train', ...), sorted or in the order of the layout's list;
        DataRootError when there are none. `warn(line)` is called with one line saying which images a
        list names more than once (each counted once)."""
        samples = SAMPLE_FINDERS[self.name](self, split, warn or (lambda line: None))
        if not samples:
            raise DataRootError(f"{self.root}: no images of {self.title} found for split '{split}'")
        return samples


def ade20k_samples(dataset, split, warn):
    """The samples of ADEChallengeData2016/images/<split folder> under the root, or under its parent."""
    folder = ADE20K_SPLIT_FOLDERS.get(split, split)
    bases = (dataset.root / "ADEChallengeData2016", dataset.root)
    for base in bases:
        images = base / "images" / folder
        annotations = base / "annotations" / folder
        if images.is_dir() and annotations.is_dir():
            return [
                Sample(image, annotations / f"{image.stem}.png", ADE20K_CODING)
                for image in sorted(images.glob("*.jpg"))
            ]
    expected = " or ".join(f"{base / 'images' / folder} with {base / 'annotations' / folder}" for base in bases)
    raise DataRootError(f"{dataset.root} is not an ADE20K root: expected {expected}")


def cityscapes_samples(dataset, split, warn):
    """The samples of leftImg8bit/<split>/<city>, labelled by gtFine labelTrainIds where that file exists
    (whatever it is: read_label says why it cannot be read), else labelIds."""
    images = dataset.root / "leftImg8bit" / split
    labels = dataset.root / "gtFine" / split
    if not (images.is_dir() and labels.is_dir()):
        raise DataRootError(f"{dataset.root} is not a Cityscapes root: expected {images} with {labels}")
    samples = []
    for image in sorted(images.glob("*/*_leftImg8bit.png")):
        prefix = image.name.removesuffix("_leftImg8bit.png")
        train_ids = labels / image.parent.name / f"{prefix}_gtFine_labelTrainIds.png"
        label_ids = labels / image.parent.name / f"{prefix}_gtFine_labelIds.png"
        if os.path.lexists(label_ids) and not os.path.lexists(train_ids):
            samples.append(Sample(image, label_ids, CITYSCAPES_LABEL_ID_CODING))
        else:
            samples.append(Sample(image, train_ids, CITYSCAPES_TRAIN_ID_CODING))
    return samples


def voc2012_samples(dataset, split, warn):
    """The samples listed in ImageSets/Segmentation/<split>.txt of the VOC2012 folder at the root,
    at root/VOC2012 or at root/VOCdevkit/VOC2012, each once."""
    bases = (dataset.root, dataset.root / "VOC2012", dataset.root / "VOCdevkit" / "VOC2012")
    for base in bases:
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if os.path.lexists(listing):
            names = listed_names(listing, warn)
            return [
                Sample(base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png", VOC2012_CODING)
                for name in names
            ]
    expected = " or ".join(str(base / "ImageSets" / "Segmentation" / f"{split}.txt") for base in bases)
    raise DataRootError(f"{dataset.root} is not a PASCAL VOC 2012 root: expected {expected}")


def listed_names(listing, warn):
    """The image names of a VOC list, one per line, each once in the order of its first line;
    DataRootError naming a line whose name is no file name. Repeated names are said in one warn line."""
    lines = {}
    for number, line in enumerate(read_text(listing, "the image list", MAX_IMAGE_LIST_BYTES).splitlines(), start=1):
        for name in line.split():
            if name in (".", "..") or "/" in name or "\0" in name:
                raise DataRootError(f"{listing}: line {number}: {name[:40]!r} is not an image name")
            lines.setdefault(name, []).append(number)
    repeated = [(name, numbers) for name, numbers in lines.items() if len(numbers) > 1]
    if repeated:
        shown = ", ".join(
            f"{name} (lines {', '.join(map(str, numbers[:LISTED_VALUES]))})"
            for name, numbers in repeated[:LISTED_VALUES]
        )
        more = f" and {len(repeated) - LISTED_VALUES} more" if len(repeated) > LISTED_VALUES else ""
        warn(f"{listing}: {len(repeated)} images listed more than once, each counted once: {shown}{more}")
    return list(lines)


def readable_image_extensions():
    """The file extensions (lower case, with the dot) of the image formats Pillow opens."""
    registered = Image.registered_extensions()
    return {extension for extension, image_format in registered.items() if image_format in Image.OPEN}


def folders_samples(dataset, split, warn):
    """The samples of images/<split> in the folders layout, each labelled by labels/<split>/<stem>.png."""
    images = dataset.root / "images" / split
    labels = dataset.root / "labels" / split
    if not (images.is_dir() and labels.is_dir()):
        raise DataRootError(f"{dataset.root} is not a folders-layout root: expected {images} with {labels}")
    extensions = readable_image_extensions()
    try:
        entries = sorted(images.iterdir())
    except OSError as error:
        raise DataRootError(f"{images}: cannot list the images ({error.strerror or error})") from None
    by_stem = {}
    for image in entries:
        if image.name.startswith(".") or image.suffix.lower() not in extensions:
            continue
        if image.stem in by_stem:
            raise DataRootError(
                f"{images}: {by_stem[image.stem].name} and {image.name} would share the label "
                f"{image.stem}{FOLDERS_LABEL_SUFFIX}; keep one of them"
            )
        by_stem[image.stem] = image
    coding = label_coding(range(dataset.classes), [IGNORE_LABEL])
    return [Sample(image, labels / f"{stem}{FOLDERS_LABEL_SUFFIX}", coding) for stem, image in by_stem.items()]


SAMPLE_FINDERS = {
    "ade20k": ade20k_samples,
    "cityscapes": cityscapes_samples,
    "voc2012": voc2012_samples,
    "folders": folders_samples,
}


def read_text(path, what, max_bytes):
    """The text of a UTF-8 file of the dataset of at most `max_bytes`, without a byte-order mark;
    DataRootError naming it otherwise. Nothing beyond `max_bytes` is read."""
    try:
        content = utils.read_small_file(path, max_bytes, what)
    except utils.FileError as error:
        raise DataRootError(str(error)) from None
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataRootError(f"{path}: cannot read {what} ({error})") from None


def content_lines(text):
    """The lines of `text`, without the blank lines at its end."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_class_names(path):
    """The class names of a classes.txt: one per line, stripped; DataRootError naming the line otherwise."""
    names = [line.strip() for line in content_lines(read_text(path, "the class names", MAX_CLASS_FILE_BYTES))]
    if not names:
        raise DataRootError(f"{path}: no class names (one per line is expected)")
    for number, name in enumerate(names, start=1):
        if not name:
            raise DataRootError(f"{path}: line {number} is empty (one class name per line is expected)")
    if len(names) > MAX_CLASSES:
        raise DataRootError(
            f"{path}: {len(names)} classes; at most {MAX_CLASSES}, "
            f"as label value {IGNORE_LABEL} marks unlabelled pixels"
        )
    return tuple(names)


def read_palette(path, classes):
    """The colours of a palette.txt, one 'R G B' line (0-255 each) per class; DataRootError naming a wrong line."""
    colours = []
    for number, line in enumerate(content_lines(read_text(path, "the palette", MAX_CLASS_FILE_BYTES)), start=1):
        match = PALETTE_LINE.fullmatch(line)
        if not match or any(int(value) > 255 for value in match.groups()):
            raise DataRootError(f"{path}: line {number} is not 'R G B' with values 0-255: {line.strip()[:40]!r}")
        colours.append(tuple(int(value) for value in match.groups()))
    if len(colours) != classes:
        raise DataRootError(f"{path}: {len(colours)} colours for the {classes} classes of {FOLDERS_CLASSES_NAME}")
    return tuple(colours)


def folders_classes(root):
    """The class names and colours of a folders-layout root: classes.txt, and palette.txt or the VOC colormap."""
    names_path = root / FOLDERS_CLASSES_NAME
    if not os.path.lexists(names_path):
        raise DataRootError(
            f"{root} is not a folders-layout root: expected {names_path} (one class name per line) "
            f"beside {root / 'images'} and {root / 'labels'}"
        )
    names = read_class_names(names_path)
    palette_path = root / FOLDERS_PALETTE_NAME
    if os.path.lexists(palette_path):
        return names, read_palette(palette_path, len(names))
    return names, bit_interleaved_colormap(len(names))


def folder_problem(path):
    """Why `path` is no directory to read a dataset from, or None; a FIFO or link loop is never opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return "dangling symbolic link" if os.path.islink(path) else "no such directory"
        return f"cannot read ({error.strerror or error})"
    return None if stat.S_ISDIR(mode) else "not a directory"


def open_dataset(name, root):
    """The Dataset of layout `name` at `root`, with its class names and palette.

    The samples of a split are listed by Dataset.samples. Raises DataRootError
    when `root` is no directory or, for the folders layout, when classes.txt or
    palette.txt is missing or malformed.
    """
    root = Path(root)
    if name not in SAMPLE_FINDERS:
        raise DataRootError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    problem = folder_problem(root)
    if problem:
        raise DataRootError(f"{root}: {problem}")
    if name == "folders":
        class_names, palette = folders_classes(root)
    else:
        class_names = tuple(class_name for class_name, _ in BENCHMARK_CLASSES[name])
        palette = tuple(colour for _, colour in BENCHMARK_CLASSES[name])
    return Dataset(name, root, class_names, palette)


def datasets_laid_out_at(root):
    """The names of the layouts `root` holds, whatever the split."""
    root = Path(root)
    found = []
    if (root / "ADEChallengeData2016" / "images").is_dir() or (
        (root / "images").is_dir() and (root / "annotations").is_dir()
    ):
        found.append("ade20k")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        found.append("cityscapes")
    if any(
        (base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir()
        for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")
    ):
        found.append("voc2012")
    if (root / "images").is_dir() and (root / "labels").is_dir():
        found.append("folders")
    return found


def read_label(sample):
    """The label file of `sample` as (class ids, undefined values).

    Class ids are a uint8 (H, W) array, IGNORE_LABEL where unlabelled; undefined
    values are the sorted label values the layout does not define, counted as
    unlabelled. Raises SampleError for a missing, special (FIFO, directory, link
    loop) or unreadable file, for one that is not an 8-bit class-index image and
    for one of more pixels than Pillow's decompression-bomb limit or this machine's
    free memory allows, found from its header before anything is decoded.
    """
    problem = utils.file_problem(sample.label)
    if problem:
        raise SampleError(sample.label, "label file missing" if problem == "no such file" else problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(sample.label) as label:
                if label.mode not in ("L", "P"):
                    raise SampleError(sample.label, f"label is not an 8-bit class-index image (mode {label.mode})")
                check_label_size(sample.label, *label.size)
                values = np.asarray(label)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise SampleError(sample.label, f"cannot read label ({error})") from None
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    undefined = tuple(int(value) for value in present if not sample.coding.defined[value])
    return sample.coding.table[values], undefined


def check_label_size(path, width, height):
    """Raises SampleError for a label of `width` x `height` pixels above Pillow's decompression-bomb
    limit (Image.MAX_IMAGE_PIXELS) or too large to count in the memory this machine has free."""
    pixels = width * height
    if Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS:
        raise SampleError(
            path, f"label is {width}x{height}, more than the {Image.MAX_IMAGE_PIXELS} pixels Pillow decodes safely"
        )
    problem = runtime.allocation_problem(pixels * LABEL_BYTES_PER_PIXEL, f"the {width}x{height} label")
    if problem:
        raise SampleError(path, problem)


def undefined_values_problem(sample, values):
    """One line saying that a label file holds values its layout does not define, counted as unlabelled."""
    shown = ", ".join(map(str, values[:LISTED_VALUES]))
    more = f" and {len(values) - LISTED_VALUES} more" if len(values) > LISTED_VALUES else ""
    return (
        f"{sample.label}: label values {shown}{more} are not among the defined values "
        f"({sample.coding.defined_values()}); counted as unlabelled"
    )
