"""Tests of utils.py and of the released models' palettes: image reading, colouring, atomic writers.

Palette values are typed from the Caffe release's colormapcs.mat / colormapvoc.mat
and the MIT Scene Parsing benchmark's color150.mat; image files are made here with
Pillow or byte by byte.
"""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL import JpegImagePlugin

import utils
from pspnet_keras import models

DATASET_MODELS = {"ade20k": "pspnet50_ade20k", "voc2012": "pspnet101_voc2012", "cityscapes": "pspnet101_cityscapes"}


def palette(dataset):
    """The uint8 (classes, 3) palette of the released model trained on `dataset`."""
    return np.array(models.RELEASED_MODELS[DATASET_MODELS[dataset]].palette, dtype=np.uint8)


def class_names(dataset):
    """The class names of the released model trained on `dataset`."""
    return models.RELEASED_MODELS[DATASET_MODELS[dataset]].class_names

CITYSCAPES = [
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
]

VOC2012 = [
    ("background", (0, 0, 0)),
    ("aeroplane", (128, 0, 0)),
    ("bicycle", (0, 128, 0)),
    ("bird", (128, 128, 0)),
    ("boat", (0, 0, 128)),
    ("bottle", (128, 0, 128)),
    ("bus", (0, 128, 128)),
    ("car", (128, 128, 128)),
    ("cat", (64, 0, 0)),
    ("chair", (192, 0, 0)),
    ("cow", (64, 128, 0)),
    ("diningtable", (192, 128, 0)),
    ("dog", (64, 0, 128)),
    ("horse", (192, 0, 128)),
    ("motorbike", (64, 128, 128)),
    ("person", (192, 128, 128)),
    ("pottedplant", (0, 64, 0)),
    ("sheep", (128, 64, 0)),
    ("sofa", (0, 192, 0)),
    ("train", (128, 192, 0)),
    ("tvmonitor", (0, 64, 128)),
]

# Spot checks across the whole ADE20K table: class id -> (name, colour).
ADE20K_SAMPLES = {
    0: ("wall", (120, 120, 120)),
    1: ("building", (180, 120, 120)),
    2: ("sky", (6, 230, 230)),
    6: ("road", (140, 140, 140)),
    8: ("windowpane", (230, 230, 230)),
    12: ("person", (150, 5, 61)),
    20: ("car", (0, 102, 200)),
    27: ("mirror", (220, 220, 220)),
    35: ("wardrobe", (7, 255, 255)),
    44: ("chest of drawers", (6, 51, 255)),
    48: ("skyscraper", (140, 140, 140)),
    55: ("case", (0, 0, 255)),
    66: ("flower", (255, 0, 0)),
    73: ("kitchen island", (0, 255, 41)),
    79: ("hovel", (255, 0, 255)),
    89: ("television receiver", (0, 255, 194)),
    93: ("pole", (51, 0, 255)),
    104: ("fountain", (8, 184, 170)),
    105: ("conveyer belt", (133, 0, 255)),
    114: ("tent", (112, 224, 255)),
    123: ("trade name", (133, 255, 0)),
    127: ("bicycle", (255, 245, 0)),
    132: ("sculpture", (255, 255, 0)),
    138: ("ashcan", (173, 0, 255)),
    141: ("crt screen", (122, 0, 255)),
    147: ("glass", (25, 194, 194)),
    148: ("clock", (102, 255, 0)),
    149: ("flag", (92, 0, 255)),
}


def png_bytes(width, height, bit_depth, colour_type, scanlines):
    """Returns a PNG file holding the given raw scanlines (filter bytes
    included), built chunk by chunk."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        size = struct.pack(">I", len(data))
        return size + kind + data + struct.pack(">I", crc)

    header = struct.pack(
        ">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines))
        + chunk(b"IEND", b"")
    )


def read_error(path):
    """Returns the message of the ImageError read_image raises for path,
    after checking it is one line starting with the file name."""
    with pytest.raises(utils.ImageError) as raised:
        utils.read_image(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def noise(shape, seed=0):
    """Returns random uint8 pixels (incompressible, so files have size)."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# Palettes and class names.


@pytest.mark.parametrize(
    "dataset, classes", [("ade20k", 150), ("voc2012", 21), ("cityscapes", 19)]
)
def test_palette_and_names_sizes(dataset, classes):
    colours = palette(dataset)
    names = class_names(dataset)
    assert colours.dtype == np.uint8
    assert colours.shape == (classes, 3)
    assert isinstance(names, tuple)
    assert len(names) == classes
    assert len(set(names)) == classes
    assert all(isinstance(name, str) and name for name in names)


def test_cityscapes_table():
    assert class_names("cityscapes") == tuple(n for n, _ in CITYSCAPES)
    assert palette("cityscapes").tolist() == [
        list(c) for _, c in CITYSCAPES
    ]


def test_voc2012_table():
    assert class_names("voc2012") == tuple(n for n, _ in VOC2012)
    assert palette("voc2012").tolist() == [list(c) for _, c in VOC2012]


def test_voc2012_palette_is_the_bit_interleaved_colormap():
    # The PASCAL colormap: bit j of id -> bit 7 - j // 3 of channel j % 3.
    expected = np.zeros((21, 3), dtype=np.uint8)
    for class_id in range(21):
        for bit in range(8):
            for channel in range(3):
                if class_id >> (3 * bit + channel) & 1:
                    expected[class_id, channel] |= 1 << (7 - bit)
    np.testing.assert_array_equal(palette("voc2012"), expected)


def test_ade20k_spot_checks():
    names = class_names("ade20k")
    colours = palette("ade20k")
    for class_id, (name, colour) in ADE20K_SAMPLES.items():
        assert names[class_id] == name, class_id
        assert tuple(colours[class_id]) == colour, class_id


def test_read_rgb_png_exact(tmp_path):
    pixels = noise((5, 7, 3))
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    result = utils.read_image(tmp_path / "rgb.png")
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, pixels)


def test_read_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.array(
        [[[10, 20, 30, 0], [200, 100, 50, 128], [1, 2, 3, 255]]],
        dtype=np.uint8,
    )
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    result = utils.read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(
        result, [[[10, 20, 30], [200, 100, 50], [1, 2, 3]]]
    )


def test_read_la_and_l_repeat_the_gray_level(tmp_path):
    Image.fromarray(
        np.array([[[100, 0], [7, 255]]], dtype=np.uint8), "LA"
    ).save(tmp_path / "la.png")
    Image.fromarray(np.array([[0, 9, 255]], dtype=np.uint8)).save(
        tmp_path / "l.png"
    )
    np.testing.assert_array_equal(
        utils.read_image(tmp_path / "la.png"), [[[100] * 3, [7] * 3]]
    )
    np.testing.assert_array_equal(
        utils.read_image(tmp_path / "l.png"), [[[0] * 3, [9] * 3, [255] * 3]]
    )


def test_read_bilevel(tmp_path):
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(
        utils.read_image(tmp_path / "bits.png"), [[[255] * 3, [0] * 3]]
    )


def test_read_palette_image(tmp_path):
    image = Image.fromarray(np.array([[0, 1, 2, 1]], dtype=np.uint8), "P")
    image.putpalette([10, 20, 30, 40, 50, 60, 250, 0, 5])
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(
        utils.read_image(tmp_path / "palette.png"),
        [[[10, 20, 30], [40, 50, 60], [250, 0, 5], [40, 50, 60]]],
    )


SIXTEEN_BIT = [0, 255, 256, 32767, 32768, 65280, 65535, 25700]
SIXTEEN_BIT_HIGH_BYTE = [0, 0, 1, 127, 128, 255, 255, 100]


def test_read_16bit_gray_png_keeps_high_byte(tmp_path):
    Image.fromarray(np.array([SIXTEEN_BIT], dtype=np.uint16)).save(
        tmp_path / "gray16.png"
    )
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    result = utils.read_image(tmp_path / "gray16.png")
    np.testing.assert_array_equal(
        result, np.repeat(np.array([SIXTEEN_BIT_HIGH_BYTE])[..., None], 3, 2)
    )


def test_read_16bit_pgm_keeps_high_byte(tmp_path):
    path = tmp_path / "gray16.pgm"
    samples = struct.pack(f">{len(SIXTEEN_BIT)}H", *SIXTEEN_BIT)
    path.write_bytes(f"P5 {len(SIXTEEN_BIT)} 1 65535\n".encode() + samples)
    assert Image.open(path).mode == "I"
    result = utils.read_image(path)
    np.testing.assert_array_equal(result[0, :, 0], SIXTEEN_BIT_HIGH_BYTE)
    np.testing.assert_array_equal(result[..., 0], result[..., 2])


def test_read_16bit_rgb_png_keeps_high_byte(tmp_path):
    # Pillow itself reduces 16-bit RGB to its high byte; gray must agree.
    path = tmp_path / "rgb16.png"
    row = struct.pack(">6H", 0x1234, 0x80FF, 0xFFFF, 0x00FF, 0x0100, 0x7FFF)
    path.write_bytes(png_bytes(2, 1, 16, 2, b"\x00" + row))
    np.testing.assert_array_equal(
        utils.read_image(path), [[[0x12, 0x80, 0xFF], [0x00, 0x01, 0x7F]]]
    )


def test_read_float_tiff_uses_pillow_conversion(tmp_path):
    values = np.array([[-5.0, 0.6, 127.5, 254.9, 300.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    result = utils.read_image(tmp_path / "float.tif")
    np.testing.assert_array_equal(result[0, :, 1], [0, 0, 127, 254, 255])


def test_read_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 48, 4), dtype=np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:32] = (0, 0, 0, 0)  # white
    cmyk[:, 32:] = (0, 0, 0, 255)  # black
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    result = utils.read_image(tmp_path / "cmyk.jpg")
    assert result.shape == (16, 48, 3)
    centres = result[8, [8, 24, 40]].astype(int)
    np.testing.assert_allclose(
        centres, [[255, 0, 0], [255, 255, 255], [0, 0, 0]], atol=3
    )


def test_read_applies_exif_orientation(tmp_path):
    # Stored 32 x 64 with quadrants red | green over blue | white; EXIF
    # orientation 6 = display after turning 90 degrees clockwise.
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:16, :32] = (255, 0, 0)
    stored[:16, 32:] = (0, 255, 0)
    stored[16:, :32] = (0, 0, 255)
    stored[16:, 32:] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    assert Image.open(path).size == (64, 32)
    result = utils.read_image(path)
    assert result.shape == (64, 32, 3)
    corners = result[[8, 8, 56, 56], [8, 24, 8, 24]].astype(int)
    np.testing.assert_allclose(
        corners,
        [[0, 0, 255], [255, 0, 0], [255, 255, 255], [0, 255, 0]],
        atol=8,
    )
    turned = np.rot90(stored, k=-1).astype(int)
    assert np.abs(result.astype(int) - turned).mean() < 4


def test_read_first_frame_of_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    frames[0].save(
        tmp_path / "anim.gif", save_all=True, append_images=frames[1:]
    )
    result = utils.read_image(tmp_path / "anim.gif")
    np.testing.assert_array_equal(result[0, 0], [255, 0, 0])


def test_read_accepts_str_paths(tmp_path):
    Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp_path / "small.png")
    assert utils.read_image(str(tmp_path / "small.png")).shape == (2, 3, 3)


# read_image: errors.


def test_image_error_is_a_value_error():
    assert issubclass(utils.ImageError, ValueError)


def test_read_missing_file(tmp_path):
    assert read_error(tmp_path / "absent.jpg").endswith(": no such file")


def test_read_directory(tmp_path):
    assert read_error(tmp_path).endswith(": is a directory, not a file")


def test_read_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture\n")
    assert read_error(path).endswith(": not an image Pillow can read")


def test_read_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert read_error(path).endswith(": empty file")


def test_read_zero_pixel_png(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(png_bytes(0, 0, 8, 2, b""))
    assert read_error(path).endswith(": not an image Pillow can read")


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_read_truncated_image(tmp_path, extension):
    complete = tmp_path / f"complete.{extension}"
    Image.fromarray(noise((64, 64, 3))).save(complete)
    data = complete.read_bytes()
    path = tmp_path / f"truncated.{extension}"
    path.write_bytes(data[: len(data) // 2])
    assert Image.open(path).size == (64, 64)  # the header alone is fine
    assert ": truncated or corrupt image data (" in read_error(path)


def test_read_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert ": image too large (" in read_error(tmp_path / "big.png")


# Colouring.


def test_colorize_voc():
    result = utils.colorize(np.array([[0, 15], [20, 8]]), palette("voc2012"))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(
        result,
        [[[0, 0, 0], [192, 128, 128]], [[0, 64, 128], [64, 0, 0]]],
    )


def test_colorize_cityscapes_every_id():
    ids = np.arange(19, dtype=np.uint8).reshape(1, 19)
    np.testing.assert_array_equal(
        utils.colorize(ids, palette("cityscapes"))[0], [c for _, c in CITYSCAPES]
    )


@pytest.mark.parametrize(
    "ids, message",
    [
        ([[0, 21]], r"class ids lie in 0\.\.20; found 0\.\.21"),
        ([[-1, 3]], r"class ids lie in 0\.\.20; found -1\.\.3"),
        ([[0.0, 1.0]], "class ids must be integers, not float64"),
    ],
)
def test_colorize_rejects_bad_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        utils.colorize(np.array(ids), palette("voc2012"))


def test_blend_rounds_halves_up():
    image = np.array([[0, 255, 1, 2, 100, 254, 10, 12]], dtype=np.uint8)
    colour = np.array([[0, 255, 0, 1, 101, 255, 10, 12]], dtype=np.uint8)
    result = utils.blend(image, colour)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, [[0, 255, 1, 2, 101, 255, 10, 12]])


def test_blend_rgb_without_stretching():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[0, 0] = (128, 64, 128)
    expected = np.full((2, 2, 3), 50)
    expected[0, 0] = (114, 82, 114)
    np.testing.assert_array_equal(utils.blend(image, colour), expected)


def test_blend_rejects_mismatched_input():
    small = np.zeros((2, 2, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="equal shape"):
        utils.blend(small, np.zeros((2, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 images, not float32"):
        utils.blend(small, small.astype(np.float32))


def test_probability_image_values():
    probabilities = np.array(
        [[0.0, 1.0, 0.5, 0.002, 0.998, 1.2, -0.1]], dtype=np.float32
    )
    result = utils.probability_image(probabilities)
    assert result.dtype == np.uint8
    # 0.5 * 255 = 127.5 rounds to even 128; 0.51 -> 1; 254.49 -> 254.
    np.testing.assert_array_equal(result, [[0, 255, 128, 1, 254, 255, 0]])


def test_probability_image_is_not_stretched():
    result = utils.probability_image(np.array([[0.4, 0.6]]))
    np.testing.assert_array_equal(result, [[102, 153]])


def test_probability_image_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        utils.probability_image(np.array([0.5, np.nan]))


def test_class_summary_sorted_by_share():
    ids = np.array([[0, 0, 1], [1, 1, 2]])
    assert utils.class_summary(ids, class_names("voc2012")) == [
        (1, "aeroplane", 0.5),
        (0, "background", pytest.approx(1 / 3)),
        (2, "bicycle", pytest.approx(1 / 6)),
    ]
    assert [row[0] for row in utils.class_summary(ids, class_names("voc2012"), top=2)] == [
        1,
        0,
    ]


def test_class_summary_ties_and_types():
    summary = utils.class_summary(np.array([[149, 3], [3, 149]]), class_names("ade20k"))
    assert summary == [(3, "floor", 0.5), (149, "flag", 0.5)]
    class_id, name, share = summary[0]
    assert type(class_id) is int and type(share) is float


def test_class_summary_many_ties_in_id_order():
    ids = np.concatenate([np.arange(149, -1, -1), [7, 7]])
    summary = utils.class_summary(ids, class_names("ade20k"))
    assert summary[0] == (7, "bed", pytest.approx(3 / 152))
    assert [row[0] for row in summary[1:]] == [i for i in range(150) if i != 7]


def test_class_summary_edge_cases():
    assert utils.class_summary(np.zeros((0, 4), dtype=int), class_names("cityscapes")) == []
    with pytest.raises(ValueError, match="found 0..19"):
        utils.class_summary(np.array([0, 19]), class_names("cityscapes"))


# Atomic writers.


def test_png_round_trip_is_lossless(tmp_path):
    rgb = noise((9, 11, 3))
    gray = noise((9, 11), seed=1)
    utils.write_image_atomic(tmp_path / "rgb.png", rgb)
    utils.write_image_atomic(tmp_path / "gray.png", gray)
    np.testing.assert_array_equal(utils.read_image(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(
        np.array(Image.open(tmp_path / "gray.png")), gray
    )
    assert sorted(os.listdir(tmp_path)) == ["gray.png", "rgb.png"]


def test_write_creates_missing_directories(tmp_path):
    path = tmp_path / "a" / "b" / "out.png"
    utils.write_image_atomic(str(path), np.zeros((2, 2, 3), dtype=np.uint8))
    assert Image.open(path).size == (2, 2)


def test_write_jpeg_quality_and_no_subsampling(tmp_path):
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = (128, 64, 128)
    utils.write_image_atomic(tmp_path / "out.JPG", pixels)
    written = Image.open(tmp_path / "out.JPG")
    assert written.format == "JPEG"
    assert JpegImagePlugin.get_sampling(written) == 0  # 4:4:4
    assert np.abs(np.array(written).astype(int) - pixels).max() <= 4


def test_write_replaces_existing_file(tmp_path):
    path = tmp_path / "out.png"
    utils.write_image_atomic(path, np.zeros((2, 2), dtype=np.uint8))
    utils.write_image_atomic(path, np.full((3, 1), 7, dtype=np.uint8))
    np.testing.assert_array_equal(np.array(Image.open(path)), [[7], [7], [7]])
    assert os.listdir(tmp_path) == ["out.png"]


def test_written_file_permissions_follow_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        utils.write_image_atomic(
            tmp_path / "out.png", np.zeros((2, 2), np.uint8)
        )
    finally:
        os.umask(previous)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "out.xyz",
            "no image format Pillow can write has the extension '.xyz'",
        ),
        ("out", "no file extension to tell the image format"),
    ],
)
def test_write_unsupported_extension(tmp_path, name, message):
    path = tmp_path / "new" / name
    with pytest.raises(utils.ImageError) as raised:
        utils.write_image_atomic(path, np.zeros((2, 2, 3), dtype=np.uint8))
    assert str(raised.value) == f"{path}: {message}"
    assert not (tmp_path / "new").exists()


def test_write_failure_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.jpg"
    utils.write_image_atomic(path, np.zeros((4, 4, 3), dtype=np.uint8))
    before = path.read_bytes()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # JPEG cannot hold alpha
    with pytest.raises(utils.ImageError) as raised:
        utils.write_image_atomic(path, rgba)
    assert str(raised.value).startswith(f"{path}: cannot write (")
    assert "RGBA" in str(raised.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.jpg"]


def test_write_array_pillow_cannot_hold(tmp_path):
    with pytest.raises(utils.ImageError, match="cannot make an image"):
        utils.write_image_atomic(
            tmp_path / "out.png", np.zeros((2, 2, 5), dtype=np.uint8)
        )
    assert os.listdir(tmp_path) == []


def test_atomic_files_write_all_or_nothing(tmp_path):
    (tmp_path / "kept.png").write_bytes(b"old")
    with pytest.raises(utils.OutputError) as raised:
        with utils.AtomicFiles() as files:
            files.write(tmp_path / "kept.png", utils.image_writer(tmp_path / "kept.png", np.zeros((2, 2), np.uint8)))
            files.write(tmp_path / "b.json", utils.json_writer({"classes": 3}))

            def disk_full(temporary):
                raise OSError(28, "No space left on device")

            files.write(tmp_path / "c.json", disk_full)
            files.commit()
    assert str(raised.value) == f"{tmp_path / 'c.json'}: cannot write (No space left on device)"
    assert sorted(os.listdir(tmp_path)) == ["kept.png"]
    assert (tmp_path / "kept.png").read_bytes() == b"old"


def test_atomic_files_refuse_to_replace_special_files(tmp_path):
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(utils.OutputError, match="exists and is not a regular file; refusing to replace it"):
        utils.write_json_atomic(tmp_path / "pipe.json", {"a": 1})
    with pytest.raises(utils.OutputError, match="is a directory"):
        utils.write_json_atomic(tmp_path, {"a": 1})
    assert os.listdir(tmp_path) == ["pipe.json"]


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda path: os.mkfifo(path), "is a FIFO, not a regular file"),
        (lambda path: os.symlink(path, path), "symbolic link loop"),
        (lambda path: os.symlink(path.parent / "absent", path), "dangling symbolic link"),
        (lambda path: path.mkdir(), "is a directory, not a file"),
        (lambda path: None, "no such file"),
    ],
)
def test_input_file_problems(tmp_path, make, problem):
    path = tmp_path / "input.png"
    make(path)
    assert utils.file_problem(path) == problem
    with pytest.raises(utils.ImageError) as raised:
        utils.read_image(path)
    assert str(raised.value) == f"{path}: {problem}"


def test_devices_are_not_input_files():
    assert utils.file_problem("/dev/zero") == "is a device, not a regular file"


def test_weights_file_problems_name_what_is_missing(tmp_path):
    assert utils.file_problem(tmp_path / "absent.h5", what="weights file") == "no such weights file"
    assert utils.file_problem(tmp_path, what="weights file") == "is a directory, not a weights file"
    (tmp_path / "model.h5").write_bytes(b"")
    assert utils.file_problem(tmp_path / "model.h5", what="weights file") is None


def test_file_problem_through_a_file_used_as_directory(tmp_path):
    (tmp_path / "file").write_text("")
    assert utils.file_problem(tmp_path / "file" / "image.png") == "cannot read (Not a directory)"
    assert utils.file_problem(tmp_path / "file" / "image.png", replace=True) is None


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda path: None, None),
        (lambda path: path.write_bytes(b"old"), None),
        (lambda path: os.symlink(path.parent / "absent", path), None),
        (lambda path: os.mkfifo(path), "exists and is not a regular file; refusing to replace it"),
        (lambda path: path.mkdir(), "is a directory"),
        (lambda path: os.symlink(path, path), "symbolic link loop"),
    ],
)
def test_output_file_problems(tmp_path, make, problem):
    """With replace=True: a missing or regular file may be replaced; a directory, FIFO or link loop may not."""
    path = tmp_path / "output.png"
    make(path)
    assert utils.file_problem(path, replace=True) == problem


def test_devices_are_never_replaced():
    assert utils.file_problem("/dev/null", replace=True) == "exists and is not a regular file; refusing to replace it"


def test_unreadable_file(tmp_path, monkeypatch):
    """A file this process may not read (os.access says no: the tests run as root, whom permission
    bits do not stop)."""
    path = tmp_path / "secret.png"
    path.write_bytes(b"")
    monkeypatch.setattr(os, "access", lambda name, mode: os.fspath(name) != os.fspath(path))
    assert utils.file_problem(path) == "cannot read (permission denied)"
    assert utils.file_problem(path, replace=True) is None


def test_read_small_file_reads_what_fits_and_never_opens_a_fifo(tmp_path):
    small = tmp_path / "small.json"
    small.write_bytes(b"{}")
    assert utils.read_small_file(small, 2, "a record") == b"{}"
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as file:
        file.truncate(1 << 30)  # a sparse gigabyte: only the first bytes are read
    with pytest.raises(utils.FileError) as refused:
        utils.read_small_file(huge, 1024, "a record")
    assert str(refused.value) == f"{huge}: larger than 1 KiB, too large for a record"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(utils.FileError) as refused:
        utils.read_small_file(tmp_path / "fifo", 1024, "a record")
    assert str(refused.value) == f"{tmp_path / 'fifo'}: is a FIFO, not a regular file"
