"""A persistent cache of compiled networks kept between runs, so that a second run does not compile again.

JAX compiles the network and the protocol's pieces with XLA when they are first called
(backend.py); XLA can write a compiled executable out and load it back
(jax.experimental.serialize_executable, the mechanism of JAX's own persistent cache).
This cache keeps them in files of its own, because JAX's own cache writes its files in
place (a run killed mid-write leaves a truncated entry that it reads again) and keys
them without the host CPU's features:

- the key is a SHA-256 of everything that could change the compiled code or its result:
  the lowered program's text (StableHLO: every operation, shape and constant; the
  weights are arguments of the program, not in it), the JAX and jaxlib versions, the
  platform and device kind, XLA_FLAGS, and the CPU's flags (XLA compiles for the
  instructions of the CPU it runs on);
- an entry is the SHA-256 of its payload followed by the payload, written to a
  temporary file and renamed into place (utils.write_atomic), so that a reader sees a
  whole entry or none; an entry whose digest does not match, or that XLA cannot load,
  is removed and compiled again;
- an entry holds a pickle (JAX's serialize_executable), which can run code when it is
  loaded: entries are read only from a folder that this user owns and that no one else
  can write (made with mode 0700, as the XDG specification asks of the folders it makes),
  and only where the entry is this user's and no one else's to write;
- the cache never stops a run: a folder that cannot be made or written, or that others
  can write, is a run without it.

The folder is PSPNET_CACHE_DIR, else pspnet-keras under XDG_CACHE_HOME (~/.cache by
default, the XDG Base Directory Specification's place for caches). PSPNET_NO_CACHE=1,
or the --no-cache of pspnet.py and evaluate.py (which sets it, for the processes the
command starts too), turns the cache off. TensorFlow (whose tf.function traces
are not kept across processes) and PyTorch (eager) compile nothing this cache could keep.
"""

import hashlib
import os
from pathlib import Path

import utils
from pspnet_keras import cpu

CACHE_DIR_VARIABLE = "PSPNET_CACHE_DIR"
NO_CACHE_VARIABLE = "PSPNET_NO_CACHE"
XDG_CACHE_VARIABLE = "XDG_CACHE_HOME"
DEFAULT_CACHE_ROOT = Path("~/.cache")
CACHE_NAME = "pspnet-keras"
JAX_FOLDER = "jax"
ENTRY_SUFFIX = ".xla"
DIGEST_BYTES = hashlib.sha256().digest_size
# Values of PSPNET_NO_CACHE that leave the cache on.
CACHE_ON_VALUES = ("", "0", "false", "no")
CACHE_OFF_VALUE = "1"
FOLDER_MODE = 0o700
ENTRY_MODE = 0o600
# Permission bits that let the group or others write a file or folder.
OTHERS_WRITE = 0o022


def disable():
    """Turns the cache off for this process and the processes it starts (--no-cache)."""
    os.environ[NO_CACHE_VARIABLE] = CACHE_OFF_VALUE


def cache_folder():
    """The cache's folder, or None when the cache is off."""
    if os.environ.get(NO_CACHE_VARIABLE, "").strip().lower() not in CACHE_ON_VALUES:
        return None
    if os.environ.get(CACHE_DIR_VARIABLE):
        return Path(os.environ[CACHE_DIR_VARIABLE]).expanduser()
    root = Path(os.environ.get(XDG_CACHE_VARIABLE) or DEFAULT_CACHE_ROOT).expanduser()
    return root / CACHE_NAME


def jax_key(lowered):
    """The hex SHA-256 naming the compiled executable of `lowered` (a jax.stages.Lowered) on this machine."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    flags = sorted(cpu.cpu_flags() or ())
    parts = [
        lowered.as_text(),
        f"jax {jax.__version__} jaxlib {jaxlib.__version__}",
        f"{device.platform} {device.device_kind}",
        os.environ.get("XLA_FLAGS", ""),
        " ".join(flags),
    ]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def private_folder(folder):
    """`folder`, made with mode 0700 if missing, when this user owns it and no one else can write it
    (nor its entries' folder); None otherwise."""
    try:
        folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        status = folder.stat()
    except OSError:
        return None
    if status.st_uid != os.getuid() or status.st_mode & OTHERS_WRITE:
        return None
    return folder


def is_private_file(path):
    """Whether the file at `path` is this user's and no one else can write it."""
    status = path.stat()
    return status.st_uid == os.getuid() and not status.st_mode & OTHERS_WRITE


def read_entry(path):
    """The payload of the entry at `path`; None when there is none, it is not whole (then it is
    removed) or someone else could have written it."""
    try:
        if not is_private_file(path):
            return None
        data = path.read_bytes()
    except OSError:
        return None
    payload = data[DIGEST_BYTES:]
    if len(data) > DIGEST_BYTES and hashlib.sha256(payload).digest() == data[:DIGEST_BYTES]:
        return payload
    remove(path)
    return None


def write_entry(path, payload):
    """Writes `payload` with its digest as the entry at `path`, atomically; nothing when it cannot."""

    def write(temporary):
        os.chmod(temporary, ENTRY_MODE)
        with open(temporary, "wb") as file:
            file.write(hashlib.sha256(payload).digest())
            file.write(payload)

    try:
        utils.write_atomic(path, write)
    except (OSError, utils.OutputError):
        pass


def remove(path):
    """Removes the file at `path` if it can."""
    try:
        path.unlink()
    except OSError:
        pass


def compiled_jax(lowered):
    """`lowered.compile()`, loaded from the cache when it holds it, else compiled and kept there.

    The executable runs on the device jax.jit compiles for when none is named, the first
    of jax.devices(); a loaded one is put there too (by default it would be spread over
    every device JAX sees, and fail at its first call where there are several).
    """
    import jax
    from jax.experimental import serialize_executable

    root = cache_folder()
    folder = private_folder(root) and private_folder(root / JAX_FOLDER) if root is not None else None
    if folder is None:
        return lowered.compile()
    path = folder / f"{jax_key(lowered)}{ENTRY_SUFFIX}"
    payload = read_entry(path)
    if payload is not None:
        try:
            return serialize_executable.deserialize_and_load(
                payload, lowered.in_tree, lowered.out_tree, execution_devices=jax.devices()[:1]
            )
        except Exception:  # noqa: BLE001 (whatever XLA raises for an entry it cannot load: compile again)
            remove(path)
    compiled = lowered.compile()
    try:
        payload, _, _ = serialize_executable.serialize(compiled)
    except Exception:  # noqa: BLE001 (an executable XLA cannot write out is used without being kept)
        return compiled
    write_entry(path, payload)
    return compiled
