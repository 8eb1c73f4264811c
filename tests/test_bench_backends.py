"""bench/backends.py end to end at a small crop: every runtime and step measured, every runtime's logits checked."""

import contextlib
import io
import json
import subprocess
import sys

import pytest

from bench import backends
from bench import measure

# The dry run starts a dozen Python processes, nine of them importing Keras: 2 minutes on 2 shared cores.
DRY_RUN_TIMEOUT_S = 600
# Every runtime computes the same net in float32: its logits agree with OpenCV's and ONNX Runtime's to
# rounding (about 1e-6 of the logits' range at crop 41), and so do their argmaxes.
MAX_RELATIVE_DIFF = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999


@pytest.mark.slow
def test_a_dry_run_measures_every_runtime_and_step_and_checks_their_logits(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.backends", "--dry-run", "--rounds", "1", "--out", str(tmp_path)],
        cwd=backends.PROJECT_ROOT, capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    (path,) = tmp_path.iterdir()
    assert path.name == f"backends_pspnet50_ade20k_{measure.cpu_facts()['kind']}_crop41.json"
    results = json.loads(path.read_text())
    assert (results["crop_size"], results["dry_run"], results["rounds"], results["calls"]) == (41, True, 1, 1)
    assert results["orders"] == [["tensorflow", "jax", "torch", "onnxruntime"]]
    assert results["machine"]["simd"] == measure.cpu_facts()["simd"]
    assert results["machine"]["cores"] >= 1
    assert set(results["runtimes"]) == set(results["agreement"]) == {"tensorflow", "jax", "torch", "onnxruntime"}
    for name, summary in results["runtimes"].items():
        (figures,) = summary["rounds"]
        assert summary["forward"]["p50_s"] > 0 and summary["crop_call"]["p50_s"] > 0
        assert figures["import_s"] > 0 and figures["build_load_s"] > 0 and figures["crop_first_call_s"] > 0
        assert figures["network_first_call_s"] > 0 and figures["peak_rss_mib"] > 0
        assert summary["startup"]["forward_s"]["p50_s"] == figures["crop_call_times_s"][0]
        assert summary["forward"]["ratio_to_onnxruntime"] > 0
        for reference in ("vs_opencv", "vs_onnxruntime"):
            agreement = results["agreement"][name][reference]
            assert agreement["relative_diff"] < MAX_RELATIVE_DIFF, (name, reference, agreement)
            assert agreement["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT, (name, reference, agreement)
        if name == "onnxruntime":
            assert "cli_noflip" not in summary
            continue
        assert figures["framework"].startswith(backends.RUNTIME_TITLES[name] + " ")
        assert figures["import_project_s"] > 0
        cli = summary["cli_noflip"]
        # Not more than the bare import necessarily: at crop 41 the pass is short, and pspnet.py skips the
        # interpreter's teardown at exit (cli.exit_process), which a bare `import keras` pays.
        assert cli["wall"]["p50_s"] > 0 and cli["bare_import"]["p50_s"] > 0
        assert cli["wall_minus_bare_import"]["p50_s"] == cli["wall"]["p50_s"] - cli["bare_import"]["p50_s"]
        assert cli["peak_rss_mib"] > 0
    assert results["agreement"]["onnxruntime"]["vs_onnxruntime"]["max_abs_diff"] == 0
    reprinted = io.StringIO()
    with contextlib.redirect_stdout(reprinted):
        assert backends.main(["--from-json", str(path)]) == 0
    assert done.stdout == reprinted.getvalue() == backends.report_text(results) + "\n"
    for title in ("TensorFlow", "JAX", "PyTorch", "ONNX Runtime"):
        assert done.stdout.count(f"| {title} ") == (3 if title != "ONNX Runtime" else 2)
