"""Mixed precision without a GPU: bfloat16 runs on TensorFlow with oneDNN on a CPU with AVX512_BF16 or AMX,
and is refused with one line elsewhere; float16, and training in any mixed precision, are refused on every CPU.

This machine's CPU has neither set. The path of a CPU that has one runs here with the feature check
(cpu.computes_bfloat16) made to say yes: Keras computes bfloat16 on any CPU (emulated, slower), and the
network computes the same numbers, so its agreement with float32 is measured here as there.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import utils
from helpers import PROJECT_ROOT
from helpers import error_lines
from helpers import save_image
from helpers import smooth_image
from pspnet_keras import cpu
from pspnet_keras import runtime
from pspnet_keras.segmenter import PSPNet

PHOTOS = sorted(path for path in (PROJECT_ROOT / "example_images").iterdir() if path.suffix in {".jpg", ".png"})
ON_TENSORFLOW = pytest.mark.skipif(
    runtime.backend_name() != "tensorflow", reason="bfloat16 runs on the CPU on TensorFlow only"
)
# The CPU the suite runs on (CI machines differ: AVX2 only, or AVX-512 with AVX512_BF16).
THIS_CPU_COMPUTES_BFLOAT16 = cpu.computes_bfloat16()
AVX2_FLAGS = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
# bfloat16 keeps 8 significant bits (a relative rounding error of up to 2**-9, 2e-3) at every layer of the
# 50-layer network; the errors add up over the layers and through the logits' differences into the
# softmax. Measured on the four example photos with the synthetic weights at crop 41 (pspnet.py's default
# protocol, the crop and its mirror): class ids as float32's at 96.5-98.7 % of the pixels (97.4 % of all),
# max |dp| 1.1e-1, mean |dp| 2.8e-4. The bounds leave a margin over those.
MAX_ABS_DP = 0.2
MAX_MEAN_ABS_DP = 1e-3
MIN_ARGMAX_AGREEMENT = 0.95
# A network that silently computed in float32 would agree to float32's rounding (about 1e-6).
MIN_MEAN_ABS_DP = 1e-5
FLOAT16_REFUSAL = (
    "precision float16 needs a GPU and none is visible (the backends emulate float16 on the CPU, slower than "
    "float32); use float32 on the CPU"
)
ONEDNN_LINE = "oneDNN custom operations are on"


@pytest.fixture
def bfloat16_cpu(monkeypatch):
    """This process as on a CPU with AVX512_BF16, TensorFlow started with oneDNN on."""
    monkeypatch.setattr(cpu, "computes_bfloat16", lambda flags=None: True)
    monkeypatch.setitem(runtime._settings, "onednn_at_start", "1")


# ---------------------------------------------------------------------------------------
# The CPU's instruction sets


def test_flags_are_the_first_processors_flags_line(tmp_path):
    listing = tmp_path / "cpuinfo"
    listing.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu sse2\n"
    )
    assert cpu.cpu_flags(listing) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu.cpu_flags(arm) is None
    assert cpu.cpu_flags(tmp_path / "absent") is None


@pytest.mark.parametrize(
    "flags, computes, absence",
    [
        ({"avx", "avx2", "fma"}, False, "this CPU has AVX2 but neither"),
        ({"avx", "avx2", "avx512f", "avx512_vnni"}, False, "this CPU has AVX-512 but neither"),
        ({"sse2"}, False, "this CPU has neither"),
        ({"avx2", "avx512f", "avx512_bf16"}, True, None),
        ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, True, None),
    ],
)
def test_bfloat16_needs_avx512_bf16_or_amx(flags, computes, absence):
    assert cpu.computes_bfloat16(flags) is computes
    if absence is not None:
        assert cpu.bfloat16_absence(flags) == absence


def test_a_cpu_whose_flags_cannot_be_read_has_neither(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: None)
    assert cpu.computes_bfloat16() is False
    assert cpu.bfloat16_absence() == "this CPU's instruction sets are unknown here (no flags line in /proc/cpuinfo)"


# ---------------------------------------------------------------------------------------
# The rule


def test_without_avx512_bf16_or_amx_bfloat16_is_one_line_naming_them(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    assert runtime.precision_problem("bfloat16", []) == (
        "precision bfloat16 on the CPU needs AVX512_BF16 or AMX, and this CPU has AVX2 but neither; "
        "use float32 or a GPU"
    )
    assert runtime.precision_problem("float16", []) == FLOAT16_REFUSAL


def test_on_a_bfloat16_cpu_bfloat16_runs_on_tensorflow_only(bfloat16_cpu, monkeypatch):
    monkeypatch.setattr(runtime, "backend_name", lambda: "tensorflow")
    assert runtime.precision_problem("bfloat16", []) is None
    for name, title in (("jax", "JAX"), ("torch", "PyTorch")):
        monkeypatch.setattr(runtime, "backend_name", lambda name=name: name)
        assert runtime.precision_problem("bfloat16", []) == (
            "precision bfloat16 on the CPU runs on TensorFlow only (the only backend measured faster in bfloat16 "
            f"than in float32 on the CPU; {title} was not measured); use --backend tensorflow or float32"
        )
        assert runtime.precision_problem("bfloat16", ["NVIDIA H100 80GB HBM3"]) is None


def test_float16_and_training_need_a_gpu_on_a_bfloat16_cpu_too(bfloat16_cpu):
    assert runtime.precision_problem("float16", []) == FLOAT16_REFUSAL
    assert runtime.precision_problem("bfloat16", [], cpu_bfloat16=False) == (
        "precision bfloat16 needs a GPU and none is visible (training runs bfloat16 on a GPU only); "
        "use float32 on the CPU"
    )
    assert runtime.precision_problem("bfloat16", ["NVIDIA H100 80GB HBM3"], cpu_bfloat16=False) is None
    assert runtime.precision_problem("float32", [], cpu_bfloat16=False) is None


@pytest.mark.parametrize("setting, on", [("0", False), ("false", False), ("FALSE", False), ("1", True),
                                         ("true", True), (None, True), ("off", True)])
def test_bfloat16_needs_the_onednn_tensorflow_started_with(bfloat16_cpu, monkeypatch, setting, on):
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it starts: 0 or false in any case turn oneDNN off;
    unset or another value leaves it on, its default on the CPUs with AVX512_BF16 or AMX."""
    monkeypatch.setattr(runtime, "backend_name", lambda: "tensorflow")
    monkeypatch.setitem(runtime._settings, "onednn_at_start", setting)
    monkeypatch.setenv(runtime.ONEDNN_VARIABLE, "1")  # what it is now does not count once TensorFlow started
    problem = runtime.precision_problem("bfloat16", [])
    if on:
        assert problem is None
    else:
        assert problem == (
            "precision bfloat16 on the CPU needs TensorFlow's oneDNN, which was off when TensorFlow started "
            f"(TF_ENABLE_ONEDNN_OPTS={setting}); set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow starts, or use float32"
        )


# ---------------------------------------------------------------------------------------
# oneDNN for bfloat16


@pytest.fixture
def unconfigured(monkeypatch):
    """os.environ without the settings configure makes, and runtime's settings, both restored afterwards."""
    for variable in (runtime.INTER_OP_VARIABLE, runtime.INTRA_OP_VARIABLE, runtime.ONEDNN_VARIABLE,
                     runtime.CPU_ALLOCATOR_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(runtime, "_settings", dict(runtime._settings))


@pytest.mark.parametrize("precision, onednn", [("bfloat16", "1"), ("float32", "0"), ("float16", "0")])
def test_configure_turns_onednn_on_for_bfloat16_only(unconfigured, precision, onednn):
    runtime.configure(precision=precision)
    assert os.environ[runtime.ONEDNN_VARIABLE] == onednn


def test_the_users_onednn_setting_wins_over_bfloat16(unconfigured, monkeypatch):
    monkeypatch.setenv(runtime.ONEDNN_VARIABLE, "0")
    runtime.configure(precision="bfloat16")
    assert os.environ[runtime.ONEDNN_VARIABLE] == "0"
    runtime.prepare_precision("bfloat16")
    assert os.environ[runtime.ONEDNN_VARIABLE] == "0"


# ---------------------------------------------------------------------------------------
# pspnet.py and the PSPNet API


def pspnet_run(*args, environment):
    """`python pspnet.py *args` in `environment`; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "pspnet.py"), *map(str, args)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300, env=environment,
    )


@pytest.mark.slow
def test_pspnet_starts_tensorflow_with_onednn_for_bfloat16_and_runs_it_or_refuses_in_one_line(tmp_path, small_weights):
    """bfloat16 on a CPU without AVX512_BF16 or AMX: exit 1, one line, nothing written; on a CPU with them
    (some CI machines): the outputs, exit 0. Either way TensorFlow's start-up lines (-v) show that
    pspnet.py started it with oneDNN on (the user's own setting winning is
    test_the_users_onednn_setting_wins_over_bfloat16's; float16's refusal is test_pspnet.py's)."""
    source = save_image(tmp_path / "photo.png", smooth_image(30, 40, 5))
    environment = {key: value for key, value in os.environ.items() if key != runtime.ONEDNN_VARIABLE}
    environment[runtime.KERAS_BACKEND_VARIABLE] = "tensorflow"
    result = pspnet_run("-w", small_weights, "-i", source, "-o", tmp_path / "out" / "photo.png",
                        "--precision", "bfloat16", "-v", environment=environment)
    assert ONEDNN_LINE in result.stderr
    assert "Traceback" not in result.stderr
    if THIS_CPU_COMPUTES_BFLOAT16:
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / "photo_seg_read.png").is_file()
        return
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"pspnet.py: error: precision bfloat16 on the CPU needs AVX512_BF16 or AMX, and {cpu.bfloat16_absence()}; "
        "use float32 or a GPU"
    ]
    assert not (tmp_path / "out").exists()


def test_the_api_refuses_bfloat16_without_avx512_bf16_or_amx(small_weights, monkeypatch):
    monkeypatch.setattr(cpu, "computes_bfloat16", lambda flags=None: False)
    with pytest.raises(ValueError) as refused:
        PSPNet(weights=small_weights, precision="bfloat16")
    assert str(refused.value) == (
        f"precision bfloat16 on the CPU needs AVX512_BF16 or AMX, and {cpu.bfloat16_absence()}; use float32 or a GPU"
    )


@ON_TENSORFLOW
def test_the_api_refuses_bfloat16_where_tensorflow_started_with_onednn_off(small_weights, bfloat16_cpu, monkeypatch):
    monkeypatch.setitem(runtime._settings, "onednn_at_start", "0")
    with pytest.raises(ValueError, match=r"needs TensorFlow's oneDNN, which was off when TensorFlow started"):
        PSPNet(weights=small_weights, precision="bfloat16")


@ON_TENSORFLOW
@pytest.mark.slow
def test_bfloat16_on_a_bfloat16_cpu_agrees_with_float32_on_the_photos(small_weights, bfloat16_cpu):
    """PSPNet in mixed bfloat16 against float32, pspnet.py's default protocol on each example photo."""
    bfloat16, float32 = (PSPNet(weights=small_weights, precision=precision) for precision in ("bfloat16", "float32"))
    assert bfloat16.model.get_layer("conv1_1_3x3_s2").compute_dtype == "bfloat16"
    assert float32.model.get_layer("conv1_1_3x3_s2").compute_dtype == "float32"
    same, pixels, largest, total = 0, 0, 0.0, 0.0
    for path in PHOTOS:
        image = utils.read_image(path)
        probabilities, expected = bfloat16.predict(image), float32.predict(image)
        assert probabilities.dtype == np.float32
        difference = np.abs(probabilities - expected)
        same += int((probabilities.argmax(-1) == expected.argmax(-1)).sum())
        pixels += difference.shape[0] * difference.shape[1]
        largest, total = max(largest, float(difference.max())), total + float(difference.sum())
    mean = total / (pixels * expected.shape[-1])
    assert same / pixels >= MIN_ARGMAX_AGREEMENT, same / pixels
    assert largest <= MAX_ABS_DP, largest
    assert MIN_MEAN_ABS_DP <= mean <= MAX_MEAN_ABS_DP, mean


# ---------------------------------------------------------------------------------------
# The benchmark


def test_the_benchmark_measures_nothing_on_an_avx2_cpu_and_says_why(tmp_path, monkeypatch, capsys):
    """On a CPU with AVX2 only (this process's flags made so, whatever CPU runs the suite): one line saying
    what it needs, exit 0, the reason and the flags in the results file."""
    from bench import bfloat16

    monkeypatch.setattr(cpu, "cpu_flags", lambda path=cpu.CPUINFO_PATH: AVX2_FLAGS)
    assert bfloat16.main(["--out", str(tmp_path)]) == 0
    why = (
        "measured nothing: pspnet.py runs bfloat16 on the CPU only with AVX512_BF16 or AMX, and "
        "this CPU has AVX2 but neither (flags: "
    )
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"bench/bfloat16.py: {why}")
    (written,) = tmp_path.iterdir()
    results = json.loads(written.read_text())
    assert written.name == f"bfloat16_pspnet50_ade20k_{results['machine']['cpu_kind']}.json"
    assert results["measured"] is False and results["why"].startswith(why)
    assert set(results["cpu_flags"]) == AVX2_FLAGS


@pytest.mark.slow
def test_a_dry_run_measures_every_runtime_and_compares_bfloat16_with_float32(tmp_path):
    """The benchmark's every step at crop 41, on any CPU (bfloat16 emulated here): each runtime timed in its
    own process with its oneDNN setting, the same network in each, bfloat16's parity on a photo (one in a
    dry run; the four are test_bfloat16_on_a_bfloat16_cpu_agrees_with_float32_on_the_photos's)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.bfloat16", "--dry-run", "--rounds", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (written,) = tmp_path.iterdir()
    results = json.loads(written.read_text())
    assert written.name == f"bfloat16_pspnet50_ade20k_{results['machine']['cpu_kind']}_crop41.json"
    assert (results["measured"], results["dry_run"], results["crop_size"], results["calls"]) == (True, True, 41, 1)
    runtimes = results["runtimes"]
    assert {name: (summary["precision"], summary["onednn"]) for name, summary in runtimes.items()} == {
        "float32": ("float32", "0"), "float32_onednn": ("float32", "1"), "bfloat16": ("bfloat16", "1"),
        "onnxruntime": ("float32", None),
    }
    assert all(summary["forward"]["p50_s"] > 0 for summary in runtimes.values())
    assert runtimes["float32"]["ratio_to_float32"]["median"] == 1
    # float32 computes ONNX Runtime's net to rounding; bfloat16 the same net to its 8 significant bits.
    logits = results["logits_vs_onnxruntime"]
    assert logits["float32"]["relative_diff"] < 1e-4 and logits["float32_onednn"]["relative_diff"] < 1e-4
    assert 1e-4 < logits["bfloat16"]["relative_diff"] < 0.1
    parity = results["parity_vs_float32"]
    assert set(parity["photos"]) == {"rocket.jpg"}
    assert parity["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT and parity["max_abs_dp"] <= MAX_ABS_DP
    assert MIN_MEAN_ABS_DP <= parity["mean_abs_dp"] <= MAX_MEAN_ABS_DP
