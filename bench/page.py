"""demo.py's page in a real browser: time to the first page, upload to result, and a 12-MP photo's memory.

    python -m bench.page [--rounds 2] [--out bench/results]
    python -m bench.page --from-json FILE        # print the tables of a saved run again

Each round starts `python demo.py -m pspnet50_ade20k -w H5 --port P` and drives Debian's Chromium
with Playwright (headless, as tests/test_demo.py does), timing:

1. start to first page: from starting demo.py to the page's Segment button shown in the browser
   (Python's start, the imports, Gradio's start, the page's load);
2. upload to result, three runs of example_images/rocket.jpg with the default protocol (one crop,
   flipped): the first loads the network (build + load + trace), the others find it loaded; each
   from handing the file to the photo box to the status line of the result;
3. beside it, the peer: `pspnet.py -m pspnet50_ade20k -w H5 -i rocket.jpg -o OUT.png -q`, the same
   photo and protocol from the command line, wall seconds;
4. a 12-MP photo (4000 x 3000 JPEG, bench/memory.py's synthetic photo): upload to result on the page;
   the peak resident memory of the server process (VmHWM, proc(5)) before and after it, against the
   peaks of pspnet.py on rocket.jpg and on the 12-MP photo (os.wait4's ru_maxrss). What the 12-MP
   photo adds to each peak is its cost: the page's against the command line's.

A screenshot of the page after the first rocket run is written beside the results (it shows the
output of synthetic weights, not a segmentation). Reported: p50 over rounds; the CPU flags, the
cores and the package versions in page_<model>_<cpu kind>.json. The weights are the seeded synthetic
ones of bench/synthetic_caffe.py converted by weight_converter.py: the time does not depend on their
values, and no output here is a segmentation result.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import measure

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

PROG = "bench/page.py"
MODEL = "pspnet50_ade20k"
ROUNDS = 2
PHOTO = PROJECT_ROOT / "example_images" / "rocket.jpg"
PHOTO_RUNS = 3
LARGE_PHOTO_SIZE = (3000, 4000)
LARGE_PHOTO_SEED = 3
JPEG_QUALITY = 92
PACKAGES = ("gradio", "playwright", "keras", "tensorflow", "numpy", "pillow")
SERVE_TIMEOUT_S = 300
RUN_TIMEOUT_MS = 600_000
STOP_TIMEOUT_S = 60
# Debian's Chromium headless as root in a closed network (tests/test_demo.py's arguments).
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run")
VIEWPORT = {"width": 1400, "height": 1800}
FIGURES = {
    "first_page_s": "start to first page",
    "first_result_s": "upload to result, first photo (network loaded)",
    "later_result_s": "upload to result, later photos (p50)",
    "cli_s": "pspnet.py on the same photo (peer)",
    "large_result_s": "upload to result, 12-MP photo",
    "server_peak_mib": "demo.py's peak memory before the 12-MP photo, MiB",
    "server_large_peak_mib": "demo.py's peak memory after the 12-MP photo, MiB",
    "cli_peak_mib": "pspnet.py's peak memory on rocket.jpg, MiB",
    "cli_large_peak_mib": "pspnet.py's peak memory on the 12-MP photo, MiB",
    "server_large_cost_mib": "the 12-MP photo's cost on the page (after - before), MiB",
    "cli_large_cost_mib": "the 12-MP photo's cost in pspnet.py (12-MP - rocket), MiB",
}


def progress(message):
    """A progress line on stderr."""
    measure.progress(PROG, message)


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_run(h5, photo, out):
    """(wall seconds, peak resident MiB) of pspnet.py segmenting `photo` with the default protocol."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "pspnet.py"), "-m", MODEL, "-w", str(h5), "-i", str(photo), "-o",
         str(out), "-q"], stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"pspnet.py failed on {photo}: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def run_on_page(page, photo):
    """Seconds from handing `photo` to the photo box to the status line of its result (a new data-run;
    it must not be an error)."""
    previous = page.eval_on_selector("#status", "status => status.querySelector('p')?.dataset.run ?? ''")
    start = time.perf_counter()
    page.set_input_files("#photo input[type=file]", str(photo))
    page.wait_for_selector("#photo img")
    page.click("#segment")
    page.wait_for_function(
        "previous => { const status = document.querySelector('#status p');"
        " return status !== null && status.dataset.run !== previous; }",
        arg=previous, timeout=RUN_TIMEOUT_MS, polling=50,
    )
    seconds = time.perf_counter() - start
    if page.query_selector("#status p.error"):
        raise RuntimeError(f"the page failed on {photo}: {page.inner_text('#status')}")
    return seconds


def first_page_seconds(browser, url, started, server):
    """(page, seconds from `started` to the page's Segment button shown), retrying until the server
    answers."""
    page = browser.new_page(viewport=VIEWPORT)
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"demo.py ended with status {server.returncode}")
        try:
            page.goto(url, timeout=5000)
            page.wait_for_selector("#segment", timeout=5000)
            return page, time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 (Playwright's errors while the server starts)
            if time.perf_counter() - started > SERVE_TIMEOUT_S:
                raise RuntimeError(f"no page after {SERVE_TIMEOUT_S} s: {error}") from None
            time.sleep(0.05)


def run_round(browser, h5, large_photo, work_dir, screenshot):
    """The FIGURES of one round."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    environment = {**os.environ, "GRADIO_TEMP_DIR": str(Path(work_dir) / "gradio")}
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "demo.py"), "-m", MODEL, "-w", str(h5), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    try:
        page, first_page_s = first_page_seconds(browser, url, started, server)
        results = [run_on_page(page, PHOTO) for _ in range(PHOTO_RUNS)]
        if screenshot is not None:
            page.screenshot(path=screenshot, full_page=True)
        server_peak = measure.peak_rss_mib(server.pid)
        large_result_s = run_on_page(page, large_photo)
        server_large_peak = measure.peak_rss_mib(server.pid)
        page.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            raise RuntimeError(f"demo.py did not stop within {STOP_TIMEOUT_S} s of SIGTERM") from None
    cli_s, cli_peak = cli_run(h5, PHOTO, Path(work_dir) / "cli" / "rocket.png")
    _, cli_large_peak = cli_run(h5, large_photo, Path(work_dir) / "cli" / "large.png")
    return {
        "first_page_s": first_page_s,
        "first_result_s": results[0],
        "later_result_s": statistics.median(results[1:]),
        "cli_s": cli_s,
        "large_result_s": large_result_s,
        "server_peak_mib": server_peak,
        "server_large_peak_mib": server_large_peak,
        "cli_peak_mib": cli_peak,
        "cli_large_peak_mib": cli_large_peak,
        "server_large_cost_mib": server_large_peak - server_peak,
        "cli_large_cost_mib": cli_large_peak - cli_peak,
    }


def large_photo_file(work_dir):
    """A 12-MP JPEG of bench/memory.py's synthetic photo."""
    from PIL import Image

    from bench.memory import synthetic_photo

    path = Path(work_dir) / "large.jpg"
    Image.fromarray(synthetic_photo(*LARGE_PHOTO_SIZE, LARGE_PHOTO_SEED)).save(path, quality=JPEG_QUALITY)
    return path


def run_benchmark(args, work_dir):
    """Makes the weights and the 12-MP photo, runs the rounds; returns the results."""
    from playwright.sync_api import sync_playwright

    from bench.synthetic_caffe import SyntheticModel

    machine = measure.machine_info(PACKAGES)
    progress("synthetic weights, converted by weight_converter.py")
    h5 = SyntheticModel(MODEL, Path(work_dir)).converted_h5
    large_photo = large_photo_file(work_dir)
    screenshot = results_path(args, machine).with_suffix(".png")
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit(f"{PROG}: Debian's Chromium is not installed: apt-get install chromium")
    rounds = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        for round_number in range(args.rounds):
            progress(f"round {round_number + 1} of {args.rounds}")
            rounds.append(run_round(browser, h5, large_photo, work_dir, screenshot if round_number == 0 else None))
        browser.close()
    return {
        "benchmark": PROG,
        "model": MODEL,
        "photo": str(PHOTO.relative_to(PROJECT_ROOT)),
        "large_photo": f"{LARGE_PHOTO_SIZE[1]} x {LARGE_PHOTO_SIZE[0]} JPEG (bench/memory.py synthetic_photo)",
        "protocol": "one crop, flipped (the page's and pspnet.py's default)",
        "weights": f"seeded synthetic (bench/synthetic_caffe.py, seed of {MODEL}), converted by weight_converter.py",
        "screenshot": screenshot.name,
        "machine": machine,
        "p50": {figure: statistics.median(figures[figure] for figures in rounds) for figure in FIGURES},
        "rounds_figures": rounds,
    }


def results_path(args, machine):
    """The results file of a run: page_<model>_<cpu kind>.json in --out."""
    return Path(args.out) / f"page_{MODEL}_{machine['cpu_kind']}.json"


def report_text(results):
    """The report of a run: one line per figure, p50 and each round."""
    rows = [
        [label, f"{results['p50'][figure]:.2f}", ", ".join(f"{figures[figure]:.2f}" for figures in results["rounds_figures"])]
        for figure, label in FIGURES.items()
    ]
    machine = results["machine"]
    return "\n".join([
        f"{PROG}: {results['model']}, {results['protocol']}; {machine['cpu']} ({machine['simd']}), "
        f"{machine['cores']} cores; synthetic weights",
        measure.markdown_table(["figure (seconds unless MiB)", "p50", "rounds"], rows),
    ])


def argument_parser():
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds (default: %(default)s)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="results folder (default: %(default)s)")
    parser.add_argument("--from-json", type=Path, metavar="FILE", help="print the tables of a saved run")
    return parser


def main(argv=None):
    """Runs the benchmark or a reprint (--from-json); returns the exit status."""
    args = argument_parser().parse_args(argv)
    return measure.reprint_or_run(PROG, run_benchmark, args, results_path, report_text)


if __name__ == "__main__":
    sys.exit(main())
