"""The web page of demo.py: a photo segmented by a PSPNet in the browser, built with Gradio (gradio.app).

The page reads the uploaded file as pspnet.py reads its images (utils.read_image)
and runs the command line's per-image path on it (segment.segment: the Caffe
release's protocol, the palette's colours, the PNG writers). It shows what that
wrote: the segmentation blended with the photo, the confidence map, and downloads
of the class ids (_seg_read.png) and colours (_seg.png); beside them a view whose
regions name their class on hover (gr.AnnotatedImage) and a legend of the classes
found with their pixel shares (utils.class_summary, as pspnet.py prints them).

Each model is loaded on first use and kept; runs are queued and go one at a time
(Gradio's queue, concurrency limit 1). A file that is no image, an image above
Pillow's decompression-bomb limit and weights that fail to load are one line on
the page, and the server goes on serving.
"""

import html
import itertools
import shutil
import socket
import time
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

import utils
from pspnet_keras import cli
from pspnet_keras import models
from pspnet_keras import segment
from pspnet_keras.segmenter import load_network

TITLE = "PSPNet"
# The protocols a run can take, as pspnet.py's flags: {label: (-s, -ms)}.
MODES = {
    "one crop": (False, False),
    "sliding crops (-s)": (True, False),
    "multi-scale (-s -ms)": (True, True),
}
DEFAULT_MODE = "one crop"
# The outputs' picture format; the ids are PNG whatever it is.
PICTURE_EXTENSION = ".png"
# The outputs' stem for a photo whose name has none (a pasted one, say).
UNNAMED_STEM = "photo"
# The hover view is the photo and its class ids at most this many pixels on the longer side:
# gr.AnnotatedImage sends one mask image per class found.
VIEW_LONG_SIDE = 768
# The result folders of the latest runs kept on disk (older ones are deleted); Gradio serves copies
# of the files it shows from its own cache, which the page empties of files older than CACHE_AGE_S.
KEPT_RUNS = 4
CACHE_AGE_S = 3600
# The largest upload the server takes (Gradio's max_file_size): a 48-MP PNG is about 100 MB.
MAX_UPLOAD = "200mb"
CSS = """
#legend table { border-collapse: collapse; }
#legend td, #legend th { padding: 2px 10px; text-align: left; }
#legend td.share { text-align: right; font-variant-numeric: tabular-nums; }
#legend .swatch { display: inline-block; width: 1.4em; height: 1em; border: 1px solid #0004; }
#status .error { color: #b00020; font-weight: 600; }
#region-name { position: absolute; z-index: 1000; pointer-events: none; padding: 2px 8px; border-radius: 4px;
               background: #000c; color: #fff; font-size: 14px; }
"""
# Names the class under the pointer in the hover view (#annotated). gr.AnnotatedImage highlights a class
# when the pointer is on its legend button; this script finds the class mask that covers the pointer (its
# alpha there, read through a canvas: MDN, CanvasRenderingContext2D.getImageData), hovers that button
# (a bubbling mouseover, as Gradio's own listener receives it) and shows the class name by the pointer.
REGION_NAMES_JS = """
(() => {
  const alphas = new WeakMap();
  let hovered = null;
  function alphaAt(mask, x, y) {
    let cached = alphas.get(mask);
    if (!cached || cached.src !== mask.src) {
      const canvas = document.createElement("canvas");
      canvas.width = mask.naturalWidth;
      canvas.height = mask.naturalHeight;
      const context = canvas.getContext("2d");
      context.drawImage(mask, 0, 0);
      cached = {src: mask.src, pixels: context.getImageData(0, 0, canvas.width, canvas.height)};
      alphas.set(mask, cached);
    }
    return cached.pixels.data[(y * cached.pixels.width + x) * 4 + 3];
  }
  function nameTag() {
    let tag = document.getElementById("region-name");
    if (!tag) {
      tag = document.createElement("div");
      tag.id = "region-name";
      document.body.appendChild(tag);
    }
    return tag;
  }
  function hover(button, event) {
    if (hovered && hovered !== button) hovered.dispatchEvent(new MouseEvent("mouseout", {bubbles: true}));
    if (button && hovered !== button) button.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
    hovered = button;
    const tag = nameTag();
    tag.hidden = !button;
    if (button) {
      tag.textContent = button.textContent;
      tag.style.left = `${event.pageX + 12}px`;
      tag.style.top = `${event.pageY + 12}px`;
    }
  }
  document.addEventListener("mousemove", (event) => {
    const view = event.target.closest ? event.target.closest("#annotated .image-container") : null;
    if (!view) {
      if (hovered) hover(null, event);
      return;
    }
    const buttons = [...view.parentElement.querySelectorAll(".legend-item")];
    for (const [index, mask] of [...view.querySelectorAll("img.mask")].entries()) {
      const box = mask.getBoundingClientRect();
      const x = Math.floor((event.clientX - box.left) / box.width * mask.naturalWidth);
      const y = Math.floor((event.clientY - box.top) / box.height * mask.naturalHeight);
      if (x >= 0 && y >= 0 && x < mask.naturalWidth && y < mask.naturalHeight && alphaAt(mask, x, y) > 0) {
        hover(buttons[index], event);
        return;
      }
    }
    hover(null, event);
  });
})();
"""
HEAD = f"<script>{REGION_NAMES_JS}</script>"
INTRODUCTION = (
    "Each model loads once, on its first photo, and is kept. Runs are queued, one at a time. "
    "The outputs are those of `pspnet.py -i PHOTO -o OUT.png` with the same protocol."
)


class PageError(Exception):
    """A run the page cannot carry out; the message is one line, shown on the page."""


def uploaded_photo(payload):
    """(path, name) of the photo box's value as it reaches the page unprocessed (Gradio's FileData: the
    file in Gradio's upload folder and the name it had on the user's machine), or None. The page
    takes it unprocessed because Gradio's processing opens it with Pillow first, and a file that is
    no image, or one above the decompression-bomb limit, is then reported by the page in
    pspnet.py's words."""
    if not payload or not payload.get("path"):
        return None
    path = Path(payload["path"])
    return path, payload.get("orig_name") or path.name


def model_choices(config, weights=None):
    """{label: (models.ModelConfig, weights path or None)} of the page's model menu: first the
    command line's model (a user model labelled with its weights file), then the released models
    not yet listed, with their default weights."""
    first = config.name if config.released else f"{config.name} ({weights})"
    choices = {first: (config, weights)}
    for name, released in models.RELEASED_MODELS.items():
        choices.setdefault(name, (released, None))
    return choices


class Networks:
    """The page's networks by model label (model_choices), each loaded on first use and kept."""

    def __init__(self, choices):
        self.choices = choices
        self.loaded = {}

    def get(self, label):
        """The PSPNet of `label`; PageError where it is not a choice or its weights cannot be
        found, downloaded or loaded (a failed load is tried again on the next run)."""
        if label not in self.choices:
            raise PageError(f"unknown model {label!r}")
        if label not in self.loaded:
            config, weights = self.choices[label]
            try:
                self.loaded[label] = load_network(config, weights, show_progress=False)
            except cli.CommandError as error:
                raise PageError(str(error)) from None
        return self.loaded[label]


class RunFolders:
    """A new folder for each run's outputs under `root`; those of all but the latest KEPT_RUNS runs are
    deleted as new ones come."""

    def __init__(self, root):
        self.root = Path(root)
        self.runs = 0

    def new(self):
        """The empty folder of the next run."""
        self.runs += 1
        shutil.rmtree(self.root / f"{self.runs - KEPT_RUNS:06d}", ignore_errors=True)
        folder = self.root / f"{self.runs:06d}"
        folder.mkdir(parents=True)
        return folder


def read_photo(path, name):
    """The uploaded photo at `path` as a uint8 (H, W, 3) RGB array, read as pspnet.py reads an image
    (utils.read_image); PageError naming the file by its `name`, not Gradio's upload folder."""
    try:
        return utils.read_image(path)
    except utils.ImageError as error:
        raise PageError(f"{name}: {str(error).removeprefix(f'{path}: ')}") from None


def view_size(height, width, long_side=VIEW_LONG_SIDE):
    """(height, width) of an image scaled down so that its longer side is at most `long_side`."""
    scale = min(1.0, long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def class_labels(found, class_names):
    """{class id: label} of the classes `found` (utils.class_summary): the class name, with the id
    where the model has two classes of that name."""
    return {
        class_id: name if class_names.count(name) == 1 else f"{name} ({class_id})"
        for class_id, name, _ in found
    }


def hex_colour(rgb):
    """'#rrggbb' of an (r, g, b) triple."""
    return "#" + "".join(f"{int(channel):02x}" for channel in rgb)


def annotated_view(image, class_ids, found, class_names, palette):
    """The value and colour map of gr.AnnotatedImage for a segmented photo: the photo and its class
    ids at view_size (ids sampled at the nearest pixel), one mask per class found, labelled and
    coloured as in the legend."""
    height, width = class_ids.shape
    view_height, view_width = view_size(height, width)
    rows = ((np.arange(view_height) + 0.5) * height / view_height).astype(np.intp)
    columns = ((np.arange(view_width) + 0.5) * width / view_width).astype(np.intp)
    view_ids = class_ids[rows[:, np.newaxis], columns]
    photo = np.asarray(Image.fromarray(image).resize((view_width, view_height), Image.Resampling.BILINEAR))
    labels = class_labels(found, class_names)
    masks = [(view_ids == class_id, labels[class_id]) for class_id, _, _ in found]
    colours = {labels[class_id]: hex_colour(palette[class_id]) for class_id, _, _ in found}
    return (photo, masks), colours


def legend_html(found, palette):
    """An HTML table of the classes `found` (utils.class_summary), largest share first: a swatch of
    the class's colour, its id, its name and its share of the pixels in per cent."""
    rows = "".join(
        f'<tr data-class-id="{class_id}"><td><span class="swatch" style="background: {hex_colour(palette[class_id])}">'
        f'</span></td><td>{class_id}</td><td>{html.escape(name)}</td><td class="share">{share * 100:.2f} %</td></tr>'
        for class_id, name, share in found
    )
    return (
        f"<table><thead><tr><th></th><th>id</th><th>class ({len(found)} found)</th><th>pixels</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def status_html(text, error=False, run_number=0):
    """The page's status line: `text`, marked as an error when `error`, and with the number of the run
    it ends (data-run), by which a script tells two runs of the same line apart."""
    css_class = "error" if error else "done"
    return f'<p class="{css_class}" role="status" data-run="{run_number}">{html.escape(text)}</p>'


def segment_photo(networks, folders, photo, label, mode, flip, progress=None):
    """Segments the uploaded photo (uploaded_photo's (path, name)) with the model `label`, the protocol
    `mode` (MODES) and `flip`, as pspnet.py does, into a new folder of `folders`. Returns (status
    line with the seconds the run took, the model's loading included; class ids; image; network;
    {kind: output path}); `progress(done, total)` counts forward passes. Raises PageError with the
    line to show."""
    started = time.monotonic()
    if photo is None:
        raise PageError("no photo: drop one on the photo box, paste one, or click the box to choose one")
    path, name = photo
    if mode not in MODES:
        raise PageError(f"unknown protocol {mode!r}")
    net = networks.get(label)
    image = read_photo(path, name)
    sliding, multi_scale = MODES[mode]
    protocol = {"sliding": sliding, "flip": bool(flip), "multi_scale": multi_scale}
    height, width = image.shape[:2]
    total = net.forward_count(height, width, **protocol)
    done = 0

    def advance(passes):
        nonlocal done
        done += passes
        if progress is not None:
            progress(done, total)

    stem = Path(name).stem or UNNAMED_STEM
    outputs = segment.output_paths(folders.new() / stem, PICTURE_EXTENSION, save_probs=False)
    try:
        class_ids = segment.segment(net, image, name, outputs, protocol, quiet=True, progress=advance)
    except utils.ImageError as error:
        raise PageError(str(error)) from None
    status = (
        f"{name}: {width} x {height}, {net.model_name}, {mode}{', flipped' if flip else ''}: {total} forward pass{'' if total == 1 else 'es'}, "
        f"{time.monotonic() - started:.1f} s"
    )
    return status, class_ids, image, net, outputs


def page_outputs(networks, folders, photo, label, mode, flip, progress=None, run_number=0):
    """The values of the page's outputs for run `run_number` (segment_photo): status, blended image,
    hover view, legend, confidence map, downloads; on a PageError its line and empty outputs."""
    try:
        status, class_ids, image, net, outputs = segment_photo(networks, folders, photo, label, mode, flip, progress)
    except PageError as error:
        return status_html(str(error), True, run_number), None, None, "", None, None
    found = utils.class_summary(class_ids, net.class_names)
    view, colours = annotated_view(image, class_ids, found, net.class_names, net.palette)
    return (
        status_html(status, False, run_number),
        str(outputs["seg_blended"]),
        gr.AnnotatedImage(value=view, color_map=colours),
        legend_html(found, net.palette),
        str(outputs["probs"]),
        [str(outputs["seg_read"]), str(outputs["seg"])],
    )


def build_page(choices, run_root, example_photos=()):
    """The Gradio page (gr.Blocks) segmenting photos with the models of `choices` (model_choices, the
    first selected), each run's outputs in a folder under `run_root`; `example_photos` are offered
    as examples."""
    networks = Networks(choices)
    folders = RunFolders(run_root)
    run_numbers = itertools.count(1)

    def run(photo, label, mode, flip, progress=gr.Progress()):
        def passes_done(done, total):
            progress((done, total), desc="forward passes", unit="passes")

        return page_outputs(networks, folders, uploaded_photo(photo), label, mode, flip, passes_done,
                            next(run_numbers))

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(CACHE_AGE_S, CACHE_AGE_S)) as page:
        gr.Markdown(f"# {TITLE}: semantic segmentation of a photo\n{INTRODUCTION}")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(
                    type="filepath", image_mode=None, sources=["upload", "clipboard"], label="photo", elem_id="photo",
                )
                model = gr.Dropdown(list(choices), value=next(iter(choices)), label="model", elem_id="model")
                mode = gr.Radio(list(MODES), value=DEFAULT_MODE, label="protocol", elem_id="mode")
                flip = gr.Checkbox(True, label="flip (add the mirror image's logits: twice the passes)", elem_id="flip")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                if example_photos:
                    gr.Examples([[str(path)] for path in example_photos], inputs=[photo], label="example photos")
            with gr.Column():
                status = gr.HTML(elem_id="status")
                blended = gr.Image(label="segmentation blended with the photo", type="filepath", interactive=False,
                                   elem_id="blended")
                annotated = gr.AnnotatedImage(label="classes: hover a region or pick a class", elem_id="annotated")
                legend = gr.HTML(elem_id="legend")
                confidence = gr.Image(label="confidence: the winning class's probability, black 0 to white 1",
                                      type="filepath", interactive=False, elem_id="confidence")
                downloads = gr.File(label="class ids (_seg_read.png) and colours (_seg.png)", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        button.click(
            run, [photo, model, mode, flip], [status, blended, annotated, legend, confidence, downloads],
            preprocess=False,
        )
    page.queue(default_concurrency_limit=1)
    return page


def launch(page, host, port, allowed_paths=()):
    """Serves `page` (build_page) on host:port in a thread of Gradio's, with the page's style and script,
    files under `allowed_paths` served too (the example photos); returns its URL. OSError where the
    address cannot be served, found by binding a socket to it first (the server's own failure there
    is a log line and Gradio's message about a range of ports)."""
    check_address(host, port)
    _, url, _ = page.launch(
        server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
        css=CSS, head=HEAD, allowed_paths=[str(path) for path in allowed_paths], max_file_size=MAX_UPLOAD,
    )
    return url


def check_address(host, port):
    """Raises OSError where a TCP server cannot listen on host:port (taken, or not this machine's)."""
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
