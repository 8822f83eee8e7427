"""Photo decoding throughput with 1 and 2 threads: does the JPEG decode scale across threads?

The Triton preprocess model decodes the photos of a request in a thread pool (`threads` parameter, default 2), so
a decoder that serialises (a process-wide lock) caps it at one core. This times `preprocessing.decode` (header,
completeness, decode at the reduced scale) and, with `--stage preprocess`, the whole `preprocess` of each photo,
in a pool of 1 and of 2 threads, interleaved and repeated because the CPU may be shared. On a busy machine the
photos/s blur, so it also runs a lock probe that contention does not hide: how many short decodes another thread
finishes while one long decode runs (a lock lets through at most one, and stalls the other thread throughout).

    .venv/bin/python fundus_hemorrhage_perf/decode_bench.py                                   # samples/*.jpg
    .venv/bin/python fundus_hemorrhage_perf/decode_bench.py --photos ../shared/data/idrid_he/images --repeats 7

To compare with another commit, run the same script against that commit's package, e.g. from a `git worktree`
of it: the first line printed names the preprocessing module that was timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2

from fundus_hemorrhage import preprocessing

ROOT = Path(__file__).resolve().parents[1]


def _rate(photos: list[bytes], threads: int, stage: str) -> tuple[float, float]:
    """(photos per second, cores busy) of one pass over `photos` in a pool of `threads` threads.

    Cores busy is the process's CPU time over the wall time (at most 1 when the decodes are serialised);
    cores busy / photos per second is the CPU time per photo, which other work on a shared machine hardly changes.
    """
    config = preprocessing.PreprocessConfig()
    work = (lambda d: preprocessing.decode(d, config)) if stage == "decode" else (
        lambda d: preprocessing.preprocess(d, config))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, photos[:threads]))  # warm the threads (and OpenCV's per-thread state)
        start, cpu = time.perf_counter(), time.process_time()
        list(pool.map(work, photos))
        wall = time.perf_counter() - start
        return len(photos) / wall, (time.process_time() - cpu) / wall


def decodes_during_one_long_decode(long: bytes, short: bytes) -> tuple[int, float]:
    """(short decodes another thread completes during one full-size decode of `long`, the longest stretch of that
    decode with none completing, as a fraction of it). A decoder lock gives (0 or 1, ~1.0)."""
    config = preprocessing.PreprocessConfig()
    full_size = preprocessing.PreprocessConfig(working_size=1 << 16)  # no DCT scaling: a decode of ~0.1 s
    done, finished = threading.Event(), []

    def other() -> None:
        while not done.is_set():
            preprocessing.decode(short, config)
            finished.append(time.perf_counter())

    thread = threading.Thread(target=other)
    thread.start()
    while len(finished) < 3:
        time.sleep(0.001)
    start = time.perf_counter()
    preprocessing.decode(long, full_size)
    end = time.perf_counter()
    done.set()
    thread.join()
    marks = [start] + [t for t in finished if start < t < end] + [end]
    return len(marks) - 2, max(b - a for a, b in zip(marks, marks[1:])) / (end - start)


def _commit(folder: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=ROOT / "samples", help="folder of *.jpg photos")
    parser.add_argument("--stage", choices=("decode", "preprocess"), default="decode")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved 1-thread / 2-thread runs")
    parser.add_argument("--min-photos", type=int, default=24,
                        help="each run decodes the folder's photos, cycled up to at least this many")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    files = sorted(args.photos.glob("*.jpg"))
    if not files:
        parser.error(f"no *.jpg in {args.photos}")
    photos = [f.read_bytes() for f in files]
    photos = (photos * -(-args.min_photos // len(photos)))[:max(args.min_photos, len(photos))]
    module = Path(preprocessing.__file__).resolve()
    print(f"timing {module.parent.name}/{module.name} at commit {_commit(module.parent)}: stage {args.stage}, "
          f"{len(photos)} photos per run ({len(files)} files), {args.repeats} repeats, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")

    # A short photo: the first one at the scale it is decoded at, re-encoded (decoded without DCT scaling).
    reduced, _, _ = preprocessing.decode(photos[0], preprocessing.PreprocessConfig())
    short = cv2.imencode(".jpg", reduced)[1].tobytes()
    probes = [decodes_during_one_long_decode(photos[0], short) for _ in range(3)]
    print("lock probe: short decodes finished by another thread during one full-size decode: "
          + ", ".join(f"{n} (longest stall {gap:.0%} of it)" for n, gap in probes))

    rates: dict[int, list[float]] = {1: [], 2: []}
    cores: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for threads in (1, 2):
            rate, busy = _rate(photos, threads, args.stage)
            rates[threads].append(rate)
            cores[threads].append(busy)
    speedups = [two / one for one, two in zip(rates[1], rates[2])]
    summary = {
        "module": module.parent.name + "/" + module.name, "commit": _commit(module.parent), "stage": args.stage,
        "photos_per_run": len(photos), "files": len(files), "repeats": args.repeats,
        "photos_per_s_1_thread": rates[1], "photos_per_s_2_threads": rates[2], "speedups": speedups,
        "cores_busy_1_thread": cores[1], "cores_busy_2_threads": cores[2], "load_average": os.getloadavg()[0],
        "probe_short_decodes": [n for n, _ in probes], "probe_longest_stall": [gap for _, gap in probes],
        "median_speedup": statistics.median(speedups),
    }
    for threads, values in rates.items():
        print(f"{threads} thread{'s' if threads > 1 else ' '}: {statistics.median(values):6.1f} photos/s "
              f"(median; {min(values):.1f}-{max(values):.1f} over {len(values)} runs), "
              f"{statistics.median(cores[threads]):.2f} cores busy, "
              f"{1000 * statistics.median(c / r for c, r in zip(cores[threads], values)):.1f} CPU ms per photo")
    print(f"2-thread speed-up: {summary['median_speedup']:.2f}x (median; per-run {min(speedups):.2f}-"
          f"{max(speedups):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
