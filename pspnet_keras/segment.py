"""One image segmented into the files pspnet.py writes, all of them or none.

`segment` runs the protocol on an image and writes its outputs: class colours
(_seg), their 50/50 blend with the image (_seg_blended), the maximum probability
as grey levels (_probs), the class ids (_seg_read.png) and, when asked, the
(H, W, classes) probabilities (_probs.npy, streamed to disk). pspnet.py, its
Ray workers (ray_pool.py) and the web page of demo.py (page.py) call it for every image.
"""

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import utils
from pspnet_keras import video

OUTPUT_SUFFIXES = {
    "seg": "_seg{ext}",
    "seg_blended": "_seg_blended{ext}",
    "probs": "_probs{ext}",
    "seg_read": "_seg_read.png",
    "probs_npy": "_probs.npy",
}
# The Pillow image mode of each picture output: colours, blend, grey probabilities.
PICTURE_MODES = {"seg": "RGB", "seg_blended": "RGB", "probs": "L"}
SUMMARY_TOP_CLASSES = 3
# Images needing at least this many forward passes get a progress bar of their own.
FORWARD_BAR_MIN_PASSES = 4


def picture_extension_problem(extension):
    """Why Pillow cannot write every picture output with this extension (e.g. '.jpg'), or None."""
    image_format = Image.registered_extensions().get(extension.lower())
    if image_format not in Image.SAVE:
        return f"cannot write images with the extension {extension!r}"
    for mode in sorted(set(PICTURE_MODES.values())):
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), format=image_format)
        except (OSError, ValueError, KeyError):
            return f"the {image_format} format of {extension!r} cannot store {mode} images; use .png or .jpg"
    return None


def read_input_image(source):
    """utils.read_image of an input of pspnet.py, whose message for a file that is no image says
    whether it could be a video (video.neither_problem)."""
    try:
        return utils.read_image(source)
    except utils.NotAnImage:
        raise utils.ImageError(f"{source}: {video.neither_problem()}") from None


def output_paths(stem, extension, save_probs):
    """The output files of one image, by kind, for the output stem and picture extension."""
    kinds = [kind for kind in OUTPUT_SUFFIXES if save_probs or kind != "probs_npy"]
    return {kind: Path(f"{stem}{OUTPUT_SUFFIXES[kind].format(ext=extension)}") for kind in kinds}


def summary_lines(source, found, verbose):
    """The classes `found` in an image (utils.class_shares) with their pixel shares: one line, or one per
    class if verbose."""
    if verbose:
        return [f"{source}: {len(found)} classes"] + [
            f"  {class_id:3d} {name:<24} {share:7.2%}" for class_id, name, share in found
        ]
    shown = ", ".join(f"{name} {share:.1%}" for _, name, share in found[:SUMMARY_TOP_CLASSES])
    more = len(found) - SUMMARY_TOP_CLASSES
    return [f"{source}: {shown}" + (f" (+{more} more classes)" if more > 0 else "")]


def probabilities_file(files, path, shape):
    """A float32 .npy of `shape` memory-mapped in a temporary file of `files` (utils.AtomicFiles) for `path`.

    Its disk space is reserved at once (posix_fallocate), so that a full disk or a file-size
    limit is utils.OutputError here, never a SIGBUS when a page of the map is written later.
    """
    temporary = files.temporary(path)
    try:
        probabilities = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape)
        with open(temporary, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    except OSError as error:
        raise utils.OutputError(f"{path}: cannot write ({error.strerror or error})") from None
    return probabilities


def segmentation(net, image, source, outputs, protocol, quiet=False, progress=None):
    """The protocol ({"sliding", "flip", "multi_scale"}) run on one image, the first half of `segment`:
    (files, class ids, their probabilities), where `files` (utils.AtomicFiles, to be completed by
    write_outputs) holds the temporary _probs.npy filled with the image's probabilities where
    `outputs` ({kind: path}) asks for one. A progress bar counts the forward passes of a long image
    unless `quiet`; `progress`, when given, is called with the number of passes done after each crop.
    Raises utils.ImageError naming `source` where memory runs out."""
    # imports Keras: only once a network is there
    from pspnet_keras.inference import OutOfMemory

    height, width = image.shape[:2]
    passes = net.forward_count(height, width, **protocol)
    files = utils.AtomicFiles()
    try:
        probabilities = None
        if "probs_npy" in outputs:
            probabilities = probabilities_file(files, outputs["probs_npy"], (height, width, net.classes))
        with tqdm(
            total=passes, unit="pass", desc="forward passes", leave=False,
            disable=quiet or passes < FORWARD_BAR_MIN_PASSES,
        ) as bar:

            def advance(done):
                bar.update(done)
                if progress is not None:
                    progress(done)

            try:
                class_ids, confidence = net.class_map(image, progress=advance, probabilities=probabilities, **protocol)
            except OutOfMemory as error:
                raise utils.ImageError(f"{source}: {error}") from None
        if probabilities is not None:
            probabilities.flush()
            del probabilities
    except BaseException:
        files.__exit__(None, None, None)
        raise
    return files, class_ids, confidence


def write_outputs(files, image, outputs, class_ids, confidence, palette):
    """The second half of `segment`: the pictures of an image's class ids and their probabilities
    written beside the temporary files of `files` (segmentation's), then all of them renamed onto
    `outputs` at once; none of them where writing fails (utils.OutputError)."""
    with files:
        colour = utils.colorize(class_ids, palette)
        pictures = {
            "seg": colour,
            "seg_blended": utils.blend(image, colour),
            "probs": utils.probability_image(confidence),
            "seg_read": class_ids,
        }
        for kind, array in pictures.items():
            files.write(outputs[kind], utils.image_writer(outputs[kind], array))
        files.commit()


def segment(net, image, source, outputs, protocol, quiet=False, progress=None):
    """Predicts one image with `protocol` ({"sliding", "flip", "multi_scale"}) and writes its `outputs`
    ({kind: path}), all or none; returns the class-id map. A progress bar counts the forward passes of
    a long image unless `quiet`; `progress` is segmentation's."""
    files, class_ids, confidence = segmentation(net, image, source, outputs, protocol, quiet, progress)
    write_outputs(files, image, outputs, class_ids, confidence, net.palette)
    return class_ids
