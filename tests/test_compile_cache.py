"""The persistent compilation cache (pspnet_keras/compile_cache.py): XLA executables kept in files named by a key
of everything that could change the compiled code, each a SHA-256 digest followed by its payload.

The suite runs on TensorFlow, so the cache is called here with JAX directly: jax.jit(f).lower(x) is the
jax.stages.Lowered that backend.CachedJit hands it. JAX is a requirement of the tests (requirements-jax.txt).
An executable is proved to come from an entry by making Lowered.compile raise while it is fetched. One slow
test runs pspnet.py on JAX, where CachedJit uses the cache, in child processes.
"""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import PROJECT_ROOT
from helpers import folder_snapshot
from pspnet_keras import compile_cache
from pspnet_keras import cpu

SCALE = 2.5
OTHER_SCALE = 3.5
SHAPE = (5, 3)
OTHER_SHAPE = (6, 3)
INPUT_SEED = 7
GARBAGE_SEED = 11
GARBAGE_BYTES = 4096
# A real XLA flag at its default value: XLA would compile the same code, but the key cannot know that.
XLA_FLAG = "--xla_cpu_enable_fast_math=false"
OTHER_CPU_FLAGS = frozenset({"fpu", "sse2"})
# float32 tanh and sums of three numbers against float64.
TOLERANCE = 1e-6
CORRUPTIONS = ("empty", "digest only", "truncated", "byte flipped", "garbage with a valid digest",
               "executable XLA cannot parse")
ON_VALUES = ("0", "", "false", "no", " No ")
OFF_VALUES = ("1", "true", "yes")

PHOTO = PROJECT_ROOT / "example_images" / "chelsea.png"
RUN_TIMEOUT_S = 300
# Installed in the commands of the slow test (PYTHONPATH): logs each read of an entry (hit or miss) and each
# write to the file $CACHE_LOG, so that a run is seen to load its executables rather than compile them.
CACHE_LOG_VARIABLE = "CACHE_LOG"
CACHE_LOG_HOOK = '''
import os

from pspnet_keras import compile_cache


def logged(function, event):
    def call(path, *rest):
        result = function(path, *rest)
        with open(os.environ["CACHE_LOG"], "a") as log:
            log.write(f"{event(result)} {path.name}\\n")
        return result

    return call


compile_cache.read_entry = logged(compile_cache.read_entry, lambda payload: "miss" if payload is None else "hit")
compile_cache.write_entry = logged(compile_cache.write_entry, lambda result: "write")
'''
# Run in a child with two CPU devices (XLA_FLAGS is read when JAX starts): compiles, then loads, and calls each.
TWO_DEVICES_PROGRAM = f'''
import jax
import jax.numpy as jnp
import numpy as np

from pspnet_keras import compile_cache

assert len(jax.devices()) == 2, jax.devices()
x = np.linspace(-1, 1, 4, dtype=np.float32)
for turn in ("compiled", "loaded"):
    lowered = jax.jit(lambda x: jnp.tanh(x) * {SCALE}).lower(jax.ShapeDtypeStruct(x.shape, x.dtype))
    print(np.asarray(compile_cache.compiled_jax(lowered)(x)).tolist())
'''


class CompileCalled(Exception):
    """Lowered.compile was called where the executable had to come from the cache."""


def scaled_tanh(scale):
    """x -> tanh(x) * scale + the column sums of x, a function whose program holds `scale` as a constant."""

    def function(x):
        return jnp.tanh(x) * scale + x.sum(axis=0)

    return function


def lowered(scale=SCALE, shape=SHAPE):
    """A fresh lowering of scaled_tanh(scale) for float32 inputs of `shape` (a new jax.jit each time)."""
    return jax.jit(scaled_tanh(scale)).lower(jax.ShapeDtypeStruct(shape, jnp.float32))


def assert_computes(executable, scale=SCALE, shape=SHAPE):
    """Asserts that `executable` computes scaled_tanh(scale) on an input of `shape`, against NumPy in float64."""
    x = np.random.default_rng(INPUT_SEED).normal(size=shape).astype(np.float32)
    expected = np.tanh(x.astype(np.float64)) * scale + x.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(np.asarray(executable(x)), expected, rtol=TOLERANCE, atol=TOLERANCE)


def entries(folder):
    """The entry files of JAX executables in the cache folder `folder`."""
    return sorted((folder / compile_cache.JAX_FOLDER).glob(f"*{compile_cache.ENTRY_SUFFIX}"))


def entry_path(folder, lowering):
    """The entry file named by the key of `lowering` in the cache folder `folder`."""
    return folder / compile_cache.JAX_FOLDER / f"{compile_cache.jax_key(lowering)}{compile_cache.ENTRY_SUFFIX}"


def is_whole(path):
    """Whether the file at `path` is a payload preceded by its SHA-256."""
    data = path.read_bytes()
    digest_bytes = hashlib.sha256().digest_size
    return len(data) > digest_bytes and hashlib.sha256(data[digest_bytes:]).digest() == data[:digest_bytes]


def with_digest(payload):
    """An entry's bytes for `payload`: its SHA-256, then the payload."""
    return hashlib.sha256(payload).digest() + payload


def unparsable_executable():
    """A payload the cache's digest and JAX's unpickling accept but XLA cannot parse: the pickled tuple of
    jax.experimental.serialize_executable, its executable replaced by random bytes."""

    class Executable:
        """Where serialize_executable pickles the XLA executable."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Executable):
                return "exec", np.random.default_rng(GARBAGE_SEED).bytes(GARBAGE_BYTES)
            return None

    with io.BytesIO() as file:
        Pickler(file).dump((Executable(), [], True))
        return file.getvalue()


def corrupted(data, corruption):
    """The bytes of the whole entry `data` after `corruption` (one of CORRUPTIONS)."""
    digest_bytes = hashlib.sha256().digest_size
    if corruption == "empty":
        return b""
    if corruption == "digest only":
        return data[:digest_bytes]
    if corruption == "truncated":
        return data[: len(data) // 2]
    if corruption == "byte flipped":
        flipped = bytearray(data)
        flipped[(digest_bytes + len(data)) // 2] ^= 0xFF
        return bytes(flipped)
    if corruption == "garbage with a valid digest":
        return with_digest(np.random.default_rng(GARBAGE_SEED).bytes(GARBAGE_BYTES))
    return with_digest(unparsable_executable())


def refuse_compiling(monkeypatch):
    """Makes Lowered.compile raise CompileCalled (until the test ends)."""

    def compile_called(self, *args, **kwargs):
        raise CompileCalled

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_called)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A cache folder of the test's (PSPNET_CACHE_DIR), the cache on."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, str(folder))
    monkeypatch.delenv(compile_cache.NO_CACHE_VARIABLE, raising=False)
    return folder


# ---------------------------------------------------------------------------------------
# Entries written and loaded


def test_first_call_keeps_an_entry_that_a_second_call_loads_without_compiling(cache, monkeypatch):
    assert_computes(compile_cache.compiled_jax(lowered()))
    [entry] = entries(cache)
    assert entry == entry_path(cache, lowered())
    assert is_whole(entry)
    kept = entry.read_bytes()
    refuse_compiling(monkeypatch)
    assert_computes(compile_cache.compiled_jax(lowered()))
    assert entries(cache) == [entry] and entry.read_bytes() == kept
    with pytest.raises(CompileCalled):
        compile_cache.compiled_jax(lowered(OTHER_SCALE))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_entry_is_compiled_again_and_rewritten_whole(cache, monkeypatch, corruption):
    compile_cache.compiled_jax(lowered())
    [entry] = entries(cache)
    damaged = corrupted(entry.read_bytes(), corruption)
    entry.write_bytes(damaged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        executable = compile_cache.compiled_jax(lowered())
    assert [str(warning.message) for warning in caught] == []
    assert_computes(executable)
    assert entries(cache) == [entry]
    assert is_whole(entry) and entry.read_bytes() != damaged
    refuse_compiling(monkeypatch)
    assert_computes(compile_cache.compiled_jax(lowered()))


def test_entry_loaded_where_jax_sees_several_devices_runs(tmp_path):
    """As on a machine with several GPUs (pspnet.py without --id): the network runs on one device."""
    environment = {
        **os.environ, compile_cache.CACHE_DIR_VARIABLE: str(tmp_path), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    environment.pop(compile_cache.NO_CACHE_VARIABLE, None)
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES_PROGRAM], capture_output=True, text=True, cwd=tmp_path,
        env=environment, timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    expected = np.tanh(x.astype(np.float64)) * SCALE
    computed = np.array([json.loads(line) for line in result.stdout.splitlines()])
    assert computed.shape == (2, 4)
    np.testing.assert_allclose(computed, [expected, expected], rtol=TOLERANCE, atol=TOLERANCE)
    assert len(entries(tmp_path)) == 1


# ---------------------------------------------------------------------------------------
# The key


def test_key_is_the_same_for_the_same_program_and_machine():
    key = compile_cache.jax_key(lowered())
    assert len(key) == 64 and set(key) <= set("0123456789abcdef")
    assert compile_cache.jax_key(lowered()) == key


def test_key_changes_with_what_could_change_the_code(cache, monkeypatch):
    assert cpu.cpu_flags() != OTHER_CPU_FLAGS
    keys = {"plain": compile_cache.jax_key(lowered())}
    compile_cache.compiled_jax(lowered())
    keys["other constant"] = compile_cache.jax_key(lowered(OTHER_SCALE))
    assert_computes(compile_cache.compiled_jax(lowered(OTHER_SCALE)), OTHER_SCALE)
    keys["other shape"] = compile_cache.jax_key(lowered(shape=OTHER_SHAPE))
    assert_computes(compile_cache.compiled_jax(lowered(shape=OTHER_SHAPE)), shape=OTHER_SHAPE)
    with monkeypatch.context() as patch:
        patch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAG}".strip())
        keys["XLA_FLAGS"] = compile_cache.jax_key(lowered())
        assert_computes(compile_cache.compiled_jax(lowered()))
    with monkeypatch.context() as patch:
        patch.setattr(cpu, "cpu_flags", lambda *args, **kwargs: OTHER_CPU_FLAGS)
        keys["CPU flags"] = compile_cache.jax_key(lowered())
        assert_computes(compile_cache.compiled_jax(lowered()))
    assert len(set(keys.values())) == len(keys), keys
    assert {entry.stem for entry in entries(cache)} == set(keys.values())
    assert all(is_whole(entry) for entry in entries(cache))


# ---------------------------------------------------------------------------------------
# Turning it off, and where it is


@pytest.mark.parametrize("value", OFF_VALUES)
def test_no_cache_variable_writes_nothing(cache, monkeypatch, value):
    monkeypatch.setenv(compile_cache.NO_CACHE_VARIABLE, value)
    assert compile_cache.cache_folder() is None
    assert_computes(compile_cache.compiled_jax(lowered()))
    assert not cache.exists()


@pytest.mark.parametrize("value", ON_VALUES)
def test_no_cache_variable_off_values_leave_it_on(cache, monkeypatch, value):
    monkeypatch.setenv(compile_cache.NO_CACHE_VARIABLE, value)
    assert compile_cache.cache_folder() == cache
    assert_computes(compile_cache.compiled_jax(lowered()))
    assert [entry.name for entry in entries(cache)] == [entry_path(cache, lowered()).name]


def test_disable_turns_it_off_through_the_environment(cache, monkeypatch):
    # Set first, so that monkeypatch takes the variable out again after the test, whatever disable() sets.
    monkeypatch.setenv(compile_cache.NO_CACHE_VARIABLE, "0")
    compile_cache.disable()
    assert os.environ[compile_cache.NO_CACHE_VARIABLE] == "1"
    assert compile_cache.cache_folder() is None
    assert_computes(compile_cache.compiled_jax(lowered()))
    assert not cache.exists()


def test_cache_dir_variable_wins_over_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.NO_CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
    assert compile_cache.cache_folder() == tmp_path / "mine"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, "~/mine")
    assert compile_cache.cache_folder() == tmp_path / "home" / "mine"


@pytest.mark.parametrize("cache_dir", [None, ""])
def test_cache_folder_defaults_to_xdg_then_home(monkeypatch, tmp_path, cache_dir):
    monkeypatch.delenv(compile_cache.NO_CACHE_VARIABLE, raising=False)
    if cache_dir is None:
        monkeypatch.delenv(compile_cache.CACHE_DIR_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, cache_dir)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_folder() == tmp_path / "xdg" / "pspnet-keras"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert compile_cache.cache_folder() == tmp_path / "home" / ".cache" / "pspnet-keras"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.cache_folder() == tmp_path / "home" / ".cache" / "pspnet-keras"


# ---------------------------------------------------------------------------------------
# A cache that cannot be used


def test_folder_below_a_regular_file_is_a_run_without_cache(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a folder")
    monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, str(blocker / "cache"))
    monkeypatch.delenv(compile_cache.NO_CACHE_VARIABLE, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_computes(compile_cache.compiled_jax(lowered()))
    assert [str(warning.message) for warning in caught] == []
    assert folder_snapshot(tmp_path) == {"file": b"not a folder"}


def test_folder_in_place_of_the_entry_is_a_run_without_cache(cache):
    entry = entry_path(cache, lowered())
    (entry / "inside").mkdir(parents=True)
    for _ in range(2):
        assert_computes(compile_cache.compiled_jax(lowered()))
    assert folder_snapshot(cache / compile_cache.JAX_FOLDER) == {entry.name: "folder", f"{entry.name}/inside": "folder"}


def test_folders_are_made_private_and_entries_written_for_this_user_alone(cache):
    compile_cache.compiled_jax(lowered())
    [entry] = entries(cache)
    assert (cache.stat().st_mode & 0o777, (cache / compile_cache.JAX_FOLDER).stat().st_mode & 0o777) == (0o700, 0o700)
    assert entry.stat().st_mode & 0o777 == 0o600


def test_folder_others_can_write_is_neither_read_nor_written(cache, monkeypatch):
    """An entry is a pickle, which runs code when it is loaded: a folder others could have written an entry
    into is not used at all."""
    compile_cache.compiled_jax(lowered())
    [entry] = entries(cache)
    kept = entry.read_bytes()
    (cache / compile_cache.JAX_FOLDER).chmod(0o777)
    refuse_compiling(monkeypatch)
    with pytest.raises(CompileCalled):
        compile_cache.compiled_jax(lowered())
    monkeypatch.undo()
    monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, str(cache))
    assert_computes(compile_cache.compiled_jax(lowered(OTHER_SCALE)), scale=OTHER_SCALE)
    assert entries(cache) == [entry] and entry.read_bytes() == kept


def test_entry_others_can_write_is_compiled_again_and_replaced_by_a_private_one(cache, monkeypatch):
    compile_cache.compiled_jax(lowered())
    [entry] = entries(cache)
    entry.chmod(0o666)
    assert_computes(compile_cache.compiled_jax(lowered()))
    assert entry.stat().st_mode & 0o777 == 0o600 and is_whole(entry)
    refuse_compiling(monkeypatch)
    assert_computes(compile_cache.compiled_jax(lowered()))


# ---------------------------------------------------------------------------------------
# pspnet.py on JAX


def pspnet_on_jax(weights, out, cache_folder, log, *flags):
    """Runs pspnet.py on JAX on the photo with the cache in `cache_folder`, its reads and writes logged
    to `log` (CACHE_LOG_HOOK); the CompletedProcess."""
    hook = log.parent / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(CACHE_LOG_HOOK)
    environment = {
        **os.environ, compile_cache.CACHE_DIR_VARIABLE: str(cache_folder), CACHE_LOG_VARIABLE: str(log),
        "PYTHONPATH": os.pathsep.join((str(hook), str(PROJECT_ROOT))),
    }
    environment.pop(compile_cache.NO_CACHE_VARIABLE, None)
    return subprocess.run(
        [sys.executable, PROJECT_ROOT / "pspnet.py", "--backend", "jax", "-w", weights, "-i", PHOTO,
         "-o", out / PHOTO.name, "--no-flip", "-q", "--save-probs", *flags],
        capture_output=True, text=True, cwd=out.parent, env=environment, timeout=RUN_TIMEOUT_S,
    )


def logged_events(log):
    """The events CACHE_LOG_HOOK logged to `log`: a list of (event, entry name)."""
    if not log.exists():
        return []
    return [tuple(line.split()) for line in log.read_text().splitlines()]


def file_identities(paths):
    """{name: (inode, modification time)} of files, which a rewrite (a new file renamed into place) changes."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in paths}


@pytest.mark.slow
def test_pspnet_on_jax_loads_the_second_run_from_the_cache_and_no_cache_keeps_nothing(tmp_path, small_weights):
    cache, other_cache = tmp_path / "cache", tmp_path / "other_cache"
    other_cache.mkdir()

    def run(name, folder, *flags):
        """(output files, cache events) of a run of pspnet.py, which must succeed and print nothing."""
        out, log = tmp_path / name, tmp_path / f"{name}.log"
        result = pspnet_on_jax(small_weights, out, folder, log, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout == ""
        return folder_snapshot(out), logged_events(log)

    first_outputs, first_events = run("first", cache)
    kept = entries(cache)
    names = sorted(entry.name for entry in kept)
    assert names and all(is_whole(entry) for entry in kept)
    assert sorted(first_events) == sorted([("miss", name) for name in names] + [("write", name) for name in names])
    identities = file_identities(kept)
    second_outputs, second_events = run("second", cache)
    assert sorted(second_events) == [("hit", name) for name in names]
    assert file_identities(entries(cache)) == identities
    no_cache_outputs, no_cache_events = run("no_cache", other_cache, "--no-cache")
    assert no_cache_events == [] and list(other_cache.iterdir()) == []
    assert f"{PHOTO.stem}_probs.npy" in first_outputs
    assert second_outputs == first_outputs and no_cache_outputs == first_outputs
