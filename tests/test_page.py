"""The web page's library (pspnet_keras/page.py) in this process, without a browser or a server.

A photo is segmented by a small user model (pspnet50_ade20k's synthetic weights with 41-pixel crops)
into the files pspnet.py writes for it, counting its forward passes; the legend and the hover view are
checked against NumPy; an upload that is no image, an empty one, one above Pillow's decompression-bomb
limit and weights that cannot be loaded or downloaded are one line naming the file; and the model menu,
the run folders and the upload payloads are what demo.py builds the page from.
"""

import re
import shutil
import struct
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import utils
from helpers import MODEL
from helpers import check_outputs
from helpers import decoded
from helpers import smooth_image
from pspnet_keras import download
from pspnet_keras import models
from pspnet_keras import page

PHOTO_HEIGHT, PHOTO_WIDTH = 30, 40
PHOTO_NAME = "photo.png"
MULTI_SCALE = "multi-scale (-s -ms)"
# The forward passes of the 30 x 40 photo with 41-pixel crops and a 48-pixel base size, by the Caffe
# release's protocol (evaluation/eval_sub.m: crops of stride ceil(41 * 2/3) = 28 cover the scaled photo,
# ceil((side - 41) / 28) + 1 along each side longer than a crop; the mirror doubles the passes).
# One crop: the photo scaled to 31 x 41 is one crop, flipped: 2 passes. Multi-scale, the longer side
# int(48 s) + 1 for s = 0.5 ... 1.75: 19 x 25 and 28 x 37 are one crop each, 37 x 49 two (1 x 2),
# 46 x 61 four (2 x 2), 55 x 73 six (2 x 3), 64 x 85 six (2 x 3): 20 passes, unflipped.
PROTOCOLS = [
    pytest.param(page.DEFAULT_MODE, True, 2, id="one-crop-flipped"),
    pytest.param(MULTI_SCALE, False, 20, id="multi-scale-unflipped"),
]
# Gradio keeps an upload in a folder of its own; the page must name it by the user's file name.
UPLOAD_FOLDER = "gradio/8d0c0ffee5a1"
UPLOAD_FILE = "upload.bin"
NO_PHOTO = "no photo: drop one on the photo box, paste one, or click the box to choose one"
GARBAGE = b"these bytes are no HDF5 file\n" * 8
# A closed port on this machine: a download from there fails at once (RFC 863's discard port, unused).
UNREACHABLE_BASE = "http://127.0.0.1:9"


class Elements(HTMLParser):
    """The elements of an HTML fragment: [(tag, {attribute: value}, text directly inside)], in order."""

    def __init__(self, markup):
        super().__init__(convert_charrefs=True)
        self.found = []
        self.stack = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs), []))
        self.stack.append(self.found[-1])

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)

    def elements(self):
        """[(tag, {attribute: value}, text directly inside)] of every element, in document order."""
        return [(tag, attrs, "".join(text)) for tag, attrs, text in self.found]


def legend_rows(markup):
    """The rows of a legend table: [(data-class-id, swatch colour '#rrggbb', [cell texts])]."""
    rows = []
    for tag, attrs, text in Elements(markup).elements():
        if tag == "tr" and "data-class-id" in attrs:
            rows.append([int(attrs["data-class-id"]), None, []])
        elif rows and tag == "span" and attrs.get("class") == "swatch":
            rows[-1][1] = re.fullmatch(r"background: (#[0-9a-f]{6})", attrs["style"]).group(1)
        elif rows and tag == "td":
            rows[-1][2].append(text)
    return [tuple(row) for row in rows]


def status_of(markup):
    """(class, role, run number, text) of the page's status line, a single <p>."""
    ((tag, attrs, text),) = Elements(markup).elements()
    assert tag == "p"
    return attrs["class"], attrs["role"], attrs["data-run"], text


def hex_of(colour):
    """'#rrggbb' of an RGB triple."""
    return "#%02x%02x%02x" % tuple(int(channel) for channel in colour)


def nearest_samples(class_ids, height, width):
    """The ids at the pixels of a (height, width) view whose centres lie in them: view pixel i takes source
    pixel floor((i + 1/2) * source / view), in exact integers."""
    source_height, source_width = class_ids.shape
    rows = (2 * np.arange(height) + 1) * source_height // (2 * height)
    columns = (2 * np.arange(width) + 1) * source_width // (2 * width)
    return class_ids[np.ix_(rows, columns)]


def uploaded(tmp_path, name, content):
    """The photo as the page takes it from Gradio (uploaded_photo): a file in an upload folder, under
    another name than the user's `name`; `content` is its bytes or a uint8 image to save as PNG."""
    path = tmp_path / UPLOAD_FOLDER / UPLOAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        Image.fromarray(content).save(path, format="PNG")
    return page.uploaded_photo({"path": str(path), "orig_name": name, "meta": {"_type": "gradio.FileData"}})


def png_of_size(path, width, height):
    """A PNG file of a bilevel width x height image that stops before its pixels: the signature, the IHDR
    chunk and the IEND chunk (PNG specification, www.w3.org/TR/png-3, sections 5 and 11)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def bomb_png(folder):
    """A PNG of 20000 x 20000 pixels, over twice Pillow's default limit (Image.MAX_IMAGE_PIXELS)."""
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    return png_of_size(folder / "bomb.png", 20000, 20000).read_bytes()


def counted_loads(monkeypatch):
    """The (model name, weights) of every page.load_network call from now on, each still loading."""
    calls = []
    load_network = page.load_network

    def counting(config, weights=None, **options):
        calls.append((config.name, weights))
        return load_network(config, weights, **options)

    monkeypatch.setattr(page, "load_network", counting)
    return calls


@pytest.fixture(scope="module")
def small_model(small_weights):
    """(Networks of the page's menu for `demo.py -w small.h5`, the small model's label), the model loaded."""
    networks = page.Networks(page.model_choices(models.resolve_model(None, small_weights), small_weights))
    label = f"small ({small_weights})"
    networks.get(label)
    return networks, label


@pytest.fixture
def gradio_cache(tmp_path, monkeypatch):
    """Gradio's cache, where gr.AnnotatedImage writes its pictures, in the test's folder."""
    folder = tmp_path / "gradio_cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


@pytest.mark.parametrize("flip, passes, flipped", [(True, 2, ", flipped"), (False, 1, "")])
def test_a_photo_is_segmented_into_the_outputs_of_its_probabilities(
    tmp_path, small_model, gradio_cache, flip, passes, flipped
):
    networks, label = small_model
    net = networks.get(label)
    image = smooth_image(PHOTO_HEIGHT, PHOTO_WIDTH, 4)
    progress = []
    status, blended, annotated, legend, confidence, downloads = page.page_outputs(
        networks, page.RunFolders(tmp_path / "runs"), uploaded(tmp_path, PHOTO_NAME, image), label,
        page.DEFAULT_MODE, flip, lambda done, total: progress.append((done, total)), run_number=7,
    )
    css_class, role, run_number, text = status_of(status)
    assert (css_class, role, run_number) == ("done", "status", "7")
    assert re.fullmatch(rf"photo\.png: 40 x 30, small, one crop{flipped}: {passes} forward {'pass' if passes == 1 else 'passes'}, \d+\.\d s", text)
    assert progress[-1] == (passes, passes) and all(total == passes for _, total in progress)
    run = tmp_path / "runs" / "000001"
    outputs = {kind: run / f"photo{suffix}" for kind, suffix in
               [("seg", "_seg.png"), ("seg_blended", "_seg_blended.png"), ("probs", "_probs.png"),
                ("seg_read", "_seg_read.png")]}
    assert (blended, confidence, downloads) == (
        str(outputs["seg_blended"]), str(outputs["probs"]), [str(outputs["seg_read"]), str(outputs["seg"])]
    )
    assert sorted(run.iterdir()) == sorted(outputs.values())
    check_outputs(image, net.predict(image, flip=flip), outputs, palette=net.palette)

    class_ids = decoded(outputs["seg_read"])
    counts = np.bincount(class_ids.ravel(), minlength=net.classes)
    present = sorted(np.flatnonzero(counts), key=lambda class_id: (-counts[class_id], class_id))
    assert [row[0] for row in legend_rows(legend)] == present
    annotations = annotated.value["annotations"]
    assert [annotation["label"] for annotation in annotations] == [net.class_names[c] for c in present]
    assert annotated.color_map == {net.class_names[c]: hex_of(net.palette[c]) for c in present}
    for class_id, annotation in zip(present, annotations):
        mask = decoded(annotation["image"]["path"])
        np.testing.assert_array_equal(mask[..., 3] == 255, class_ids == class_id)
        assert (mask[class_ids == class_id, :3] == net.palette[class_id]).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode, flip, passes", PROTOCOLS)
def test_the_forward_passes_of_each_protocol_are_counted(tmp_path, small_model, mode, flip, passes):
    """The passes the page reports, and counts to the end, are the protocol's (the files against
    pspnet.py's: tests/test_demo.py, through the page in a browser)."""
    networks, label = small_model
    photo = uploaded(tmp_path, PHOTO_NAME, smooth_image(PHOTO_HEIGHT, PHOTO_WIDTH, 5))
    progress = []
    status, class_ids, _, net, outputs = page.segment_photo(
        networks, page.RunFolders(tmp_path / "runs"), photo, label, mode, flip,
        lambda done, total: progress.append((done, total)),
    )
    protocol = {"sliding": mode != page.DEFAULT_MODE, "multi_scale": mode == MULTI_SCALE, "flip": flip}
    assert net.forward_count(PHOTO_HEIGHT, PHOTO_WIDTH, **protocol) == passes
    assert progress[-1] == (passes, passes)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert re.fullmatch(rf"photo\.png: 40 x 30, small, {re.escape(mode)}{', flipped' * flip}: {passes} forward "
                        r"passes, \d+\.\d s", status)



def test_the_legend_lists_the_classes_by_share_with_their_colours_and_escaped_names():
    names = [f"class {index}" for index in range(150)]
    names[42] = "a<b> & \"c\" 'd'"
    palette = np.random.default_rng(1).integers(0, 256, (150, 3), dtype=np.uint8)
    pixels = np.repeat([7, 3, 0, 149, 42], [660, 500, 400, 400, 1])
    class_ids = np.random.default_rng(2).permutation(pixels).astype(np.uint8).reshape(37, 53)
    markup = page.legend_html(utils.class_summary(class_ids, names), palette)

    counts = np.bincount(class_ids.ravel(), minlength=150)
    rows = legend_rows(markup)
    assert [class_id for class_id, _, _ in rows] == [7, 3, 0, 149, 42]  # by decreasing share, ties by id
    shares = []
    for class_id, swatch, (swatch_cell, id_cell, name_cell, share_cell) in rows:
        assert (swatch_cell, id_cell, name_cell) == ("", str(class_id), names[class_id])
        assert swatch == hex_of(palette[class_id])
        share = float(re.fullmatch(r"(\d+\.\d\d) %", share_cell).group(1))
        assert abs(share - 100 * counts[class_id] / class_ids.size) <= 0.005
        shares.append(share)
    assert abs(sum(shares) - 100) <= 0.005 * len(shares)
    assert "<td>a&lt;b&gt; &amp; &quot;c&quot; &#x27;d&#x27;</td>" in markup
    assert "class (5 found)" in [text for tag, _, text in Elements(markup).elements() if tag == "th"]


@pytest.mark.parametrize("height, width", [(3000, 4000), (4000, 3000), (900, 1700), (30, 40)])
def test_the_hover_view_is_the_photo_and_its_ids_at_most_the_view_size(height, width):
    names = ["wall", "tree", 'sky <&> "blue"', "tree", "road"]
    palette = np.array([[120, 120, 120], [4, 200, 3], [6, 230, 230], [204, 255, 4], [140, 140, 140]], np.uint8)
    class_ids = np.zeros((height, width), np.uint8)
    class_ids[height // 4 : height // 2, width // 3 : 2 * width // 3] = 1
    class_ids[: height // 8, width // 2 :] = 2
    class_ids[height // 2 :, : width // 5] = 3
    class_ids[-1, -1] = 4
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (200, 30, 60)
    image[:, width // 2 :] = (10, 220, 90)
    found = utils.class_summary(class_ids, names)

    (photo, masks), colours = page.annotated_view(image, class_ids, found, names, palette)

    view_height, view_width = photo.shape[:2]
    scale = max(view_height, view_width) / max(height, width)
    assert max(view_height, view_width) == min(page.VIEW_LONG_SIDE, max(height, width))
    assert abs(view_height - height * scale) <= 0.5 and abs(view_width - width * scale) <= 0.5
    middle = view_width // 2
    assert (photo[:, : middle - 3] == (200, 30, 60)).all() and (photo[:, middle + 3 :] == (10, 220, 90)).all()
    labels = {0: "wall", 1: "tree (1)", 2: 'sky <&> "blue"', 3: "tree (3)", 4: "road"}
    view_ids = nearest_samples(class_ids, view_height, view_width)
    assert [label for _, label in masks] == [labels[class_id] for class_id, _, _ in found]
    for (class_id, _, _), (mask, _) in zip(found, masks):
        np.testing.assert_array_equal(mask, view_ids == class_id)
    assert colours == {labels[class_id]: hex_of(palette[class_id]) for class_id, _, _ in found}
    legend = legend_rows(page.legend_html(found, palette))
    assert [(class_id, swatch) for class_id, swatch, _ in legend] == [
        (class_id, colours[labels[class_id]]) for class_id, _, _ in found
    ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.jpg", b"shopping list: eggs, flour\n", re.escape("notes.jpg: not an image Pillow can read")),
        ('holiday <1> & "2".png', b"", re.escape('holiday <1> & "2".png: empty file')),
        ("panorama.png", bomb_png, re.escape("panorama.png: image too large (") + r".*400000000 pixels.*\)"),
        (None, None, re.escape(NO_PHOTO)),
    ],
    ids=["text", "empty", "bomb", "none"],
)
def test_an_upload_that_is_no_usable_photo_is_one_line_naming_it(tmp_path, small_model, name, content, message):
    networks, label = small_model
    if callable(content):
        content = content(tmp_path)
    photo = None if name is None else uploaded(tmp_path, name, content)
    folders = page.RunFolders(tmp_path / "runs")
    with pytest.raises(page.PageError) as failure:
        page.segment_photo(networks, folders, photo, label, page.DEFAULT_MODE, True)
    assert re.fullmatch(message, str(failure.value))
    assert UPLOAD_FOLDER not in str(failure.value)

    status, *outputs = page.page_outputs(networks, folders, photo, label, page.DEFAULT_MODE, True, run_number=12)
    assert status_of(status) == ("error", "status", "12", str(failure.value))
    assert outputs == [None, None, "", None, None]
    if "&" in (name or ""):
        assert 'holiday &lt;1&gt; &amp; &quot;2&quot;.png: empty file' in status
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_unknown_model_or_protocol_is_a_page_error(tmp_path, small_model):
    networks, label = small_model
    photo = uploaded(tmp_path, PHOTO_NAME, smooth_image(PHOTO_HEIGHT, PHOTO_WIDTH, 6))
    with pytest.raises(page.PageError, match="^unknown model 'pspnet18_mnist'$"):
        networks.get("pspnet18_mnist")
    with pytest.raises(page.PageError, match="^unknown protocol 'three crops'$"):
        page.segment_photo(networks, page.RunFolders(tmp_path / "runs"), photo, label, "three crops", True)


def test_a_model_loads_once_and_weights_that_failed_to_load_are_tried_again(tmp_path, small_weights, monkeypatch):
    calls = counted_loads(monkeypatch)
    weights = tmp_path / "mine.h5"
    weights.write_bytes(GARBAGE)
    shutil.copy(small_weights.with_suffix(".json"), weights.with_suffix(".json"))
    networks = page.Networks(page.model_choices(models.resolve_model(None, weights), weights))
    label = f"mine ({weights})"
    with pytest.raises(page.PageError) as failure:
        networks.get(label)
    assert str(failure.value).startswith(f"{weights}: ") and "\n" not in str(failure.value)

    weights.unlink()
    weights.symlink_to(small_weights.resolve())
    net = networks.get(label)
    assert networks.get(label) is net
    assert (net.model_name, net.crop_size) == ("mine", 41)
    assert calls == [("mine", weights), ("mine", weights)]


def test_released_weights_that_cannot_be_downloaded_are_one_line_and_tried_again(tmp_path, monkeypatch):
    calls = counted_loads(monkeypatch)
    monkeypatch.setattr(download, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setenv(download.WEIGHTS_URL_BASE_VARIABLE, UNREACHABLE_BASE)
    networks = page.Networks(page.model_choices(models.RELEASED_MODELS[MODEL]))
    for _ in range(2):
        with pytest.raises(page.PageError) as failure:
            networks.get(MODEL)
        message = str(failure.value)
        assert f"{UNREACHABLE_BASE}/{MODEL}.h5" in message and str(tmp_path / "weights" / f"{MODEL}.h5") in message
        assert "\n" not in message
        assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").iterdir())
    assert calls == [(MODEL, None), (MODEL, None)]

    missing = tmp_path / "elsewhere" / f"{MODEL}.h5"
    networks = page.Networks(page.model_choices(models.RELEASED_MODELS[MODEL], missing))
    with pytest.raises(page.PageError, match=f"^{re.escape(str(missing))}: no such weights file$"):
        networks.get(MODEL)


def test_the_menu_lists_the_command_lines_model_first_then_the_released_ones(small_weights):
    user = models.resolve_model(None, small_weights)
    assert list(page.model_choices(user, small_weights).items()) == [
        (f"small ({small_weights})", (user, small_weights)),
        ("pspnet50_ade20k", (models.RELEASED_MODELS["pspnet50_ade20k"], None)),
        ("pspnet101_voc2012", (models.RELEASED_MODELS["pspnet101_voc2012"], None)),
        ("pspnet101_cityscapes", (models.RELEASED_MODELS["pspnet101_cityscapes"], None)),
    ]
    voc = models.RELEASED_MODELS["pspnet101_voc2012"]
    assert list(page.model_choices(voc, small_weights).items()) == [
        ("pspnet101_voc2012", (voc, small_weights)),
        ("pspnet50_ade20k", (models.RELEASED_MODELS["pspnet50_ade20k"], None)),
        ("pspnet101_cityscapes", (models.RELEASED_MODELS["pspnet101_cityscapes"], None)),
    ]
    assert list(page.model_choices(models.RELEASED_MODELS["pspnet50_ade20k"])) == [
        "pspnet50_ade20k", "pspnet101_voc2012", "pspnet101_cityscapes",
    ]


def test_only_the_latest_run_folders_are_kept(tmp_path):
    folders = page.RunFolders(tmp_path / "runs")
    made = []
    for _ in range(page.KEPT_RUNS + 3):
        folder = folders.new()
        assert folder.is_dir() and not any(folder.iterdir()) and folder not in made
        (folder / "photo_seg.png").write_bytes(b"an output")
        made.append(folder)
        assert sorted((tmp_path / "runs").iterdir()) == sorted(made[-page.KEPT_RUNS :])


@pytest.mark.parametrize(
    "payload, name",
    [
        (None, None),
        ({}, None),
        ({"path": None, "orig_name": "photo.jpg"}, None),
        ({"path": "PATH", "orig_name": "holiday.jpg", "meta": {"_type": "gradio.FileData"}}, "holiday.jpg"),
        ({"path": "PATH", "orig_name": None}, UPLOAD_FILE),
        ({"path": "PATH"}, UPLOAD_FILE),
    ],
)
def test_the_photo_boxs_value_is_its_file_and_the_users_name_for_it(tmp_path, payload, name):
    path = tmp_path / UPLOAD_FOLDER / UPLOAD_FILE
    if payload and payload.get("path") == "PATH":
        payload = {**payload, "path": str(path)}
    assert page.uploaded_photo(payload) == (None if name is None else (path, name))
