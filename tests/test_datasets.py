"""Tests of datasets.py: layouts found, samples listed, labels read, and a folders dataset's classes."""

import os

import numpy as np
import pytest
from PIL import Image

from pspnet_keras import datasets
from pspnet_keras import palettes

HEIGHT, WIDTH = 4, 6


def save_label(path, values):
    """Writes label values as an 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, np.uint8)).save(path)


def save_image(path):
    """Writes a small grey image in the format of the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (WIDTH, HEIGHT), (90, 90, 90)).save(path)


def make_folders(root, names=("sky", "tree", "road"), images=("a.png", "b.jpg")):
    """A folders-layout root with the given class names and val images, each with a label of zeros."""
    for name in images:
        save_image(root / "images" / "val" / name)
        save_label(root / "labels" / "val" / f"{name.rsplit('.', 1)[0]}.png", np.zeros((HEIGHT, WIDTH)))
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in names))
    return root


def test_folders_samples_pair_images_of_any_format_with_png_labels(tmp_path):
    root = make_folders(tmp_path, images=("b.jpg", "a.png", "c.tiff", "D.JPEG"))
    (root / "images" / "val" / "readme.txt").write_text("no image\n")
    save_image(root / "images" / "val" / ".hidden.png")
    save_image(root / "images" / "train" / "t.png")
    save_label(root / "labels" / "train" / "t.png", np.zeros((HEIGHT, WIDTH)))
    samples = datasets.open_dataset("folders", root).samples("val")
    assert [(s.image.name, s.label.name) for s in samples] == [
        ("D.JPEG", "D.png"), ("a.png", "a.png"), ("b.jpg", "b.png"), ("c.tiff", "c.png")
    ]
    assert all(s.label.parent == root / "labels" / "val" for s in samples)
    train = datasets.open_dataset("folders", root).samples("train")
    assert [s.image.name for s in train] == ["t.png"]


def test_folders_images_sharing_a_label_are_refused(tmp_path):
    root = make_folders(tmp_path, images=("a.png", "a.jpg"))
    with pytest.raises(datasets.DataRootError) as error:
        datasets.open_dataset("folders", root).samples("val")
    assert str(error.value) == (
        f"{root / 'images' / 'val'}: a.jpg and a.png would share the label a.png; keep one of them"
    )


def test_folders_classes_and_palette(tmp_path):
    root = make_folders(tmp_path, names=("sky", " tree ", "road"))
    (root / "classes.txt").write_bytes("\ufeffsky\n tree \nroad\n\n\n".encode("utf-8"))
    dataset = datasets.open_dataset("folders", root)
    assert dataset.class_names == ("sky", "tree", "road") and dataset.classes == 3
    assert dataset.palette == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    (root / "palette.txt").write_text("1 2 3\n  4   5 6\n255 0 255\n")
    assert datasets.open_dataset("folders", root).palette == ((1, 2, 3), (4, 5, 6), (255, 0, 255))


@pytest.mark.parametrize("classes, palette, message", [
    ("sky\n\nroad\n", None, "classes.txt: line 2 is empty (one class name per line is expected)"),
    ("\n\n", None, "classes.txt: no class names (one per line is expected)"),
    ("".join(f"c{i}\n" for i in range(256)), None,
     "classes.txt: 256 classes; at most 255, as label value 255 marks unlabelled pixels"),
    ("sky\nroad\n", "1 2 3\n", "palette.txt: 1 colours for the 2 classes of classes.txt"),
    ("sky\nroad\n", "1 2 3\n4 256 6\n", "palette.txt: line 2 is not 'R G B' with values 0-255: '4 256 6'"),
    ("sky\nroad\n", "1 2 3\n4,5,6\n", "palette.txt: line 2 is not 'R G B' with values 0-255: '4,5,6'"),
    ("sky\nroad\n", "1 2 3\n4 5 6 7\n", "palette.txt: line 2 is not 'R G B' with values 0-255: '4 5 6 7'"),
])
def test_malformed_class_files_are_named_with_the_line(tmp_path, classes, palette, message):
    root = make_folders(tmp_path)
    (root / "classes.txt").write_text(classes)
    if palette is not None:
        (root / "palette.txt").write_text(palette)
    with pytest.raises(datasets.DataRootError) as error:
        datasets.open_dataset("folders", root)
    assert str(error.value) == f"{root}/{message}"


def test_missing_or_special_classes_file(tmp_path):
    root = make_folders(tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(datasets.DataRootError, match="is not a folders-layout root: expected .*classes.txt"):
        datasets.open_dataset("folders", root)
    os.mkfifo(root / "classes.txt")
    with pytest.raises(datasets.DataRootError) as error:
        datasets.open_dataset("folders", root)
    assert str(error.value) == f"{root / 'classes.txt'}: is a FIFO, not a regular file"


def test_layouts_found_at_a_root(tmp_path):
    (tmp_path / "ade" / "ADEChallengeData2016" / "images").mkdir(parents=True)
    for folder in ("leftImg8bit", "gtFine"):
        (tmp_path / "city" / folder).mkdir(parents=True)
    for folder in ("JPEGImages", "SegmentationClass"):
        (tmp_path / "voc" / "VOCdevkit" / "VOC2012" / folder).mkdir(parents=True)
    make_folders(tmp_path / "mine")
    assert {name: datasets.datasets_laid_out_at(tmp_path / name) for name in ("ade", "city", "voc", "mine")} == {
        "ade": ["ade20k"], "city": ["cityscapes"], "voc": ["voc2012"], "mine": ["folders"]
    }
    assert datasets.datasets_laid_out_at(tmp_path / "absent") == []


def test_read_label_maps_values_and_names_undefined_ones(tmp_path):
    """ADE20K: value 0 unlabelled, k + 1 class k, 151 and 200 undefined; folders: 0-2 classes, 255 unlabelled."""
    path = tmp_path / "label.png"
    save_label(path, [[0, 1, 150, 151, 200, 2]])
    class_ids, undefined = datasets.read_label(datasets.Sample(tmp_path / "x.jpg", path, datasets.ADE20K_CODING))
    assert class_ids.tolist() == [[255, 0, 149, 255, 255, 1]] and class_ids.dtype == np.uint8
    assert undefined == (151, 200)
    save_label(path, [[0, 1, 2, 3, 255, 9]])
    root = make_folders(tmp_path / "mine")
    (sample,) = datasets.open_dataset("folders", root).samples("val")[:1]
    sample = datasets.Sample(sample.image, path, sample.coding)
    class_ids, undefined = datasets.read_label(sample)
    assert class_ids.tolist() == [[0, 1, 2, 255, 255, 255]] and undefined == (3, 9)
    assert datasets.undefined_values_problem(sample, undefined) == (
        f"{path}: label values 3, 9 are not among the defined values (0-2, 255); counted as unlabelled"
    )


def test_cityscapes_label_ids_define_0_to_33():
    coding = datasets.CITYSCAPES_LABEL_ID_CODING
    assert coding.defined_values() == "0-33"
    assert coding.table[[7, 26, 33, 0, 34]].tolist() == [0, 13, 18, 255, 255]


@pytest.mark.parametrize("problem, content", [
    ("label file missing", None),
    ("is a directory, not a file", "directory"),
    ("label is not an 8-bit class-index image (mode RGB)", "rgb"),
])
def test_unusable_labels_are_sample_errors(tmp_path, problem, content):
    path = tmp_path / "label.png"
    if content == "directory":
        path.mkdir()
    if content == "rgb":
        Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(datasets.SampleError) as error:
        datasets.read_label(datasets.Sample(tmp_path / "x.jpg", path, datasets.VOC2012_CODING))
    assert (error.value.path, error.value.problem) == (path, problem)


def test_voc_colormap():
    colours = palettes.bit_interleaved_colormap(256)
    assert colours[:21] == tuple(colour for _, colour in palettes.VOC2012_CLASSES)
    assert len(set(colours)) == 256
    # The colour VOC's SegmentationClass files give the 255 'void' border.
    assert colours[255] == (224, 224, 192)


def make_voc_list(root, text):
    """A VOC2012 root whose val list is `text`, with an image and a label for 'a' and 'b'."""
    for name in ("a", "b"):
        save_image(root / "JPEGImages" / f"{name}.jpg")
        save_label(root / "SegmentationClass" / f"{name}.png", np.zeros((HEIGHT, WIDTH)))
    listing = root / "ImageSets" / "Segmentation" / "val.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text(text)
    return listing


def test_voc_names_listed_again_are_counted_once_with_one_warning(tmp_path):
    listing = make_voc_list(tmp_path, "b\na\nb\nb a\n")
    warnings = []
    samples = datasets.open_dataset("voc2012", tmp_path).samples("val", warnings.append)
    assert [sample.image.name for sample in samples] == ["b.jpg", "a.jpg"]
    assert warnings == [
        f"{listing}: 2 images listed more than once, each counted once: b (lines 1, 3, 4), a (lines 2, 4)"
    ]
    assert len(datasets.open_dataset("voc2012", tmp_path).samples("val")) == 2


def test_voc_list_of_distinct_names_warns_nothing(tmp_path):
    make_voc_list(tmp_path, "a\nb\n")
    warnings = []
    assert len(datasets.open_dataset("voc2012", tmp_path).samples("val", warnings.append)) == 2
    assert warnings == []


@pytest.mark.parametrize("name", ["sub/a", "..", ".", "/abs"])
def test_voc_list_names_are_file_names(tmp_path, name):
    listing = make_voc_list(tmp_path, f"a\n\n{name}\n")
    with pytest.raises(datasets.DataRootError) as error:
        datasets.open_dataset("voc2012", tmp_path).samples("val")
    assert str(error.value) == f"{listing}: line 3: {name!r} is not an image name"


def test_cityscapes_train_id_file_is_preferred_whatever_it_is(tmp_path):
    image = tmp_path / "leftImg8bit" / "val" / "aachen" / "aachen_1_leftImg8bit.png"
    save_image(image)
    labels = tmp_path / "gtFine" / "val" / "aachen"
    save_label(labels / "aachen_1_gtFine_labelIds.png", np.zeros((HEIGHT, WIDTH)))
    os.mkfifo(labels / "aachen_1_gtFine_labelTrainIds.png")
    (sample,) = datasets.open_dataset("cityscapes", tmp_path).samples("val")
    assert sample.label == labels / "aachen_1_gtFine_labelTrainIds.png"
    assert sample.coding is datasets.CITYSCAPES_TRAIN_ID_CODING
    os.unlink(labels / "aachen_1_gtFine_labelTrainIds.png")
    (sample,) = datasets.open_dataset("cityscapes", tmp_path).samples("val")
    assert sample.label == labels / "aachen_1_gtFine_labelIds.png"


def test_label_of_more_pixels_than_pillow_decodes_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "label.png"
    save_label(path, np.zeros((HEIGHT, WIDTH)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", HEIGHT * WIDTH - 1)
    with pytest.raises(datasets.SampleError) as error:
        datasets.read_label(datasets.Sample(tmp_path / "x.jpg", path, datasets.VOC2012_CODING))
    assert error.value.problem == f"label is {WIDTH}x{HEIGHT}, more than the 23 pixels Pillow decodes safely"


@pytest.mark.parametrize("kind, problem", [
    ("missing", "no such directory"), ("file", "not a directory"), ("fifo", "not a directory"),
    ("loop", "symbolic link loop"), ("dangling", "dangling symbolic link"),
])
def test_a_root_that_is_no_directory_is_named(tmp_path, kind, problem):
    root = tmp_path / "root"
    {"missing": lambda path: None, "file": lambda path: path.write_text("x"), "fifo": os.mkfifo,
     "loop": lambda path: os.symlink(path, path),
     "dangling": lambda path: os.symlink(tmp_path / "absent", path)}[kind](root)
    with pytest.raises(datasets.DataRootError) as error:
        datasets.open_dataset("ade20k", root)
    assert str(error.value) == f"{root}: {problem}"
