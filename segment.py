#!/usr/bin/env python3
"""Find haemorrhages in retinal fundus photographs with the segmentation service (the Triton ensemble).

The command line of fundus_hemorrhage.client.

    python segment.py PATH [PATH ...] --output DIR [--url HOST:PORT] [--protocol grpc|http]
                      [--batch-size 8] [--probability] [--concurrency 2] [--timeout S]
                      [--routing-key KEY] [--unet-version N]

PATH is a photo or a folder; folders are searched recursively for .jpg .jpeg .png .tif .tiff .bmp files
(hidden files and the output folder are skipped). A photo named explicitly is sent whatever its extension.

For each photo, DIR receives (<stem> is the file name without extension; if two photos share a stem, the
extension, then a counter, is appended to keep their outputs apart):
  <stem>_mask.png         8-bit mask at the photo's own size: 255 = haemorrhage, 0 = background
  <stem>_overlay.png      the photo with the lesions outlined, coloured by ETDRS zone (red central subfield,
                          orange inner ring, yellow outer ring, cyan outside the grid), the ETDRS grid around
                          the fovea (0.5, 1.5, 3 mm radii, 1 disc diameter taken as 1.8 mm), the optic disc
                          outline, the fovea and a legend; without a retinal frame, cyan outlines and the reason
  <stem>_thumb.jpg        a small copy of the overlay, for index.html
  <stem>_lesions.json     the lesion report (schema 2.0: lesions, totals, field of view, model, threshold, eye,
                          optic disc, fovea, scale, retinal quadrants, ETDRS subfields, findings),
                          or for a photo that failed {"status": "error", "error": reason}
  <stem>_probability.png  with --probability: round(255 * p) per pixel
and once per run index.html: every photo with its thumbnail, counts per zone and findings, linking its files.

    python segment.py --compare BASELINE FOLLOW_UP [BASELINE FOLLOW_UP ...] --output DIR

compares visits of one eye (model hemorrhage_progression): PATHs are photo files taken as pairs, in order. Each
photo gets the files above, and each pair (<name> = <baseline stem>_vs_<follow-up stem>) gets <name>_change.json
(the change report), <name>_side_by_side.jpg (both overlays), <name>_difference.png (the follow-up registered onto
the baseline, two colours: magenta darker at follow-up; new lesions yellow, resolved cyan, enlarged orange,
shrunk blue) and a section of
index.html. Exit status 1 when a pair could not be compared (its reason is printed and in its report).
Pixels follow the photo as stored: EXIF orientation is reported in the JSON, not applied.

At the end a table lists every photo: status, lesion count, total lesion area (pixels and % of the
field of view) and time (its share of the request's round trip plus writing its files). A request the
server refuses as a whole is retried one photo at a time, so that each failure gets its own reason.

Exit status: 0 every photo segmented; 1 at least one photo failed; 2 usage error (bad arguments,
no photos found, output folder not writable, server unreachable or model not ready).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # keep grpc's C-core log lines off the clinic's console

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fundus_hemorrhage import client as service  # noqa: E402
from fundus_hemorrhage import overlay as drawing  # noqa: E402
from fundus_hemorrhage import progression_client  # noqa: E402
from fundus_hemorrhage.comparison_files import write_comparison  # noqa: E402
from fundus_hemorrhage.contract import MAX_BATCH_SIZE, MAX_PAIRS, PROGRESSION  # noqa: E402
from fundus_hemorrhage.files import write_atomically  # noqa: E402
from fundus_hemorrhage.report import error_report  # noqa: E402
from fundus_hemorrhage.report_index import THUMBNAIL_WIDTH, write_index  # noqa: E402

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
OUTLINE_BGR = drawing.UNZONED_BGR  # cyan: stands out on the red-orange fundus
_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]


class UsageError(Exception):
    """Something the user must fix before anything can be segmented (exit status 2)."""


@dataclass
class Photo:
    path: Path
    name: str  # output stem, unique within the run
    index: int = 0  # position in the run, for the summary order


@dataclass
class PhotoOutput:
    """What the run made of one photo: the service's answer and the files written (or why there are none)."""
    photo: Photo
    ok: bool
    report: dict
    mask: bytes = b""
    probability: bytes = b""
    error: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- photos

def collect_photos(paths: list[str | Path], exclude: str | Path | None = None) -> list[Photo]:
    """Photos named by `paths` (files as given; folders searched recursively), each once, in order.

    Files under `exclude` (the output folder) are skipped when searching folders. A path that does not
    exist raises UsageError.
    """
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for raw in paths:
        path = Path(raw)
        if path.is_file():
            add(path)
        elif path.is_dir():
            for root, dirs, files in os.walk(path, followlinks=True):
                root_path = Path(root)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and (excluded is None or (root_path / d).resolve() != excluded))
                for name in sorted(files):
                    if not name.startswith(".") and name.lower().endswith(PHOTO_EXTENSIONS):
                        add(root_path / name)
        elif path.exists():
            raise UsageError(f"not a file or folder: {path}")
        else:
            raise UsageError(f"no such file or folder: {path}")
    return [Photo(p, n, i) for i, (p, n) in enumerate(zip(found, output_names(found)))]


def output_names(paths: list[Path]) -> list[str]:
    """Output stems: the file stem, or stem_ext, or stem_ext_2, ... when stems collide."""
    names, used = [], set()
    for p in paths:
        name = p.stem
        if name in used:
            name = f"{p.stem}_{p.suffix.lstrip('.').lower()}" if p.suffix else p.stem
        base, n = name, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------- requests

def failed(photo: Photo, reason: str, seconds: float = 0.0, report: dict | None = None) -> PhotoOutput:
    return PhotoOutput(photo, False, report or error_report(None, reason), error=reason, seconds=seconds)


def process_batch(client, protocol: str, photos: list[Photo], probability: bool, timeout: float,
                  output: Path, parameters: dict | None = None) -> list[PhotoOutput]:
    """Segment `photos` in one request and write their outputs."""
    readable, images, results = [], [], []
    for photo in photos:
        try:
            images.append(photo.path.read_bytes())
            readable.append(photo)
        except OSError as exc:
            results.append(finish_one(failed(photo, f"cannot read the file: {exc.strerror or exc}"), output))
    answers = service.segment(client, protocol, images, probability, timeout, parameters)
    for photo, data, answer in zip(readable, images, answers):
        if answer.ok:
            done = PhotoOutput(photo, True, answer.report, answer.mask_png, answer.probability_png,
                               seconds=answer.seconds)
            results.append(finish_one(done, output, data))
        else:
            results.append(finish_one(failed(photo, answer.error, answer.seconds, answer.report), output))
    return results


def finish_one(result: PhotoOutput, output: Path, photo_bytes: bytes | None = None) -> PhotoOutput:
    start = time.monotonic()
    try:
        write_outputs(result, output, photo_bytes)
    except OSError as exc:
        result.ok = False
        result.error = f"could not write the outputs: {exc.strerror or exc}"
    result.seconds += time.monotonic() - start
    return result


# ----------------------------------------------------------------------------------------------- outputs

OUTPUT_KINDS = {"mask": "png", "overlay": "png", "thumb": "jpg", "lesions": "json", "probability": "png"}


def output_paths(output: Path, name: str) -> dict[str, Path]:
    return {kind: output / f"{name}_{kind}.{ext}" for kind, ext in OUTPUT_KINDS.items()}


def write_outputs(result: PhotoOutput, output: Path, photo_bytes: bytes | None = None) -> None:
    """Mask, overlay, report (and probability) of one photo; for a failure the error report only."""
    paths = output_paths(output, result.photo.name)
    report = dict(result.report, source=str(result.photo.path))
    write_atomically(paths["lesions"], (json.dumps(report, indent=2) + "\n").encode())
    if not result.ok:  # don't leave an earlier run's mask next to a report that says "error"
        for kind in ("mask", "overlay", "thumb", "probability"):
            paths[kind].unlink(missing_ok=True)
        return
    write_atomically(paths["mask"], result.mask)
    if result.probability:
        write_atomically(paths["probability"], result.probability)
    if photo_bytes is None:
        photo_bytes = result.photo.path.read_bytes()
    try:
        overlay = draw_overlay(photo_bytes, result.mask, report=result.report)
    except ValueError as exc:
        paths["overlay"].unlink(missing_ok=True)
        paths["thumb"].unlink(missing_ok=True)
        result.notes.append(f"no overlay: {exc}")
        return
    ok, buf = cv2.imencode(".png", overlay, _PNG_FAST)
    if not ok:
        result.notes.append("no overlay: PNG encoding failed")
        return
    write_atomically(paths["overlay"], buf.tobytes())
    scale = min(1.0, THUMBNAIL_WIDTH / overlay.shape[1])
    thumb = cv2.resize(overlay, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if ok:
        write_atomically(paths["thumb"], buf.tobytes())


def decode_photo(photo_bytes: bytes) -> np.ndarray:
    """8-bit BGR pixels as stored (EXIF orientation not applied, like the server)."""
    buf = np.frombuffer(photo_bytes, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if buf.size else None
    if image is None:
        raise ValueError("the photo could not be decoded locally")
    return image


def draw_overlay(photo_bytes: bytes, mask_png: bytes, colour: tuple[int, int, int] = OUTLINE_BGR,
                 report: dict | None = None) -> np.ndarray:
    """The photo at full size with each lesion outlined just outside its edge (the lesion stays visible); with
    the report, coloured by ETDRS zone with the grid, disc, fovea and legend (fundus_hemorrhage.overlay)."""
    image = decode_photo(photo_bytes)
    mask = cv2.imdecode(np.frombuffer(mask_png, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError("the mask could not be decoded")
    return drawing.draw_overlay(image, mask, report, colour)


# ----------------------------------------------------------------------------------------------- summary

def index_row(result: PhotoOutput, output: Path) -> dict:
    """One photo's row of index.html: its name, report, error and the files of it that exist."""
    paths = output_paths(output, result.photo.name)
    files = {kind: path.name for kind, path in paths.items() if result.ok and path.exists()}
    files["lesions"] = paths["lesions"].name
    return {"name": result.photo.path.name, "ok": result.ok, "error": result.error, "report": result.report,
            "files": files, "notes": result.notes}


def summary_table(results: list[PhotoOutput]):
    from rich.table import Table

    table = Table(title="Haemorrhage segmentation", show_lines=False)
    table.add_column("Photo", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Lesions", justify="right")
    table.add_column("Area px", justify="right")
    table.add_column("Area % FOV", justify="right")
    table.add_column("Time s", justify="right")
    table.add_column("Note", overflow="fold")
    short = [r.photo.path.name for r in results]
    for r in results:
        name = r.photo.path.name if short.count(r.photo.path.name) == 1 else str(r.photo.path)
        if r.ok:
            totals = r.report.get("totals", {})
            table.add_row(escape(name), "[green]ok[/green]", str(totals.get("count", "?")),
                          f"{totals.get('area_px', 0):,}",
                          f"{100.0 * totals.get('area_fov_fraction', 0.0):.3f}", f"{r.seconds:.2f}",
                          escape("; ".join(r.notes)))
        else:
            table.add_row(escape(name), "[red]FAILED[/red]", "-", "-", "-", f"{r.seconds:.2f}",
                          escape(r.error))
    return table


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="segment.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="photo files and/or folders (searched recursively)")
    p.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="folder for the results")
    p.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="Triton address (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default: grpc")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help=f"photos per request, 1..{MAX_BATCH_SIZE} (default 8)")
    p.add_argument("--probability", action="store_true", help="also write <stem>_probability.png")
    p.add_argument("--compare", action="store_true",
                   help="PATHs are pairs BASELINE FOLLOW_UP of one eye: register and report what changed")
    p.add_argument("--routing-key", metavar="KEY",
                   help="A/B routing: a pseudonymous patient or study id; its photos always get the same unet version")
    p.add_argument("--unet-version", type=int, metavar="N", help="A/B routing: pin this unet version")
    p.add_argument("--concurrency", type=int, default=2, metavar="N", help="requests in flight (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for one request (default 300)")
    args = p.parse_args(argv)
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        p.error(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if not args.timeout > 0:
        p.error("--timeout must be positive")
    args.url = service.normalise_url(args.url, args.protocol)
    return args


def usage_error(message: str) -> int:
    print(f"segment.py: {message}", file=sys.stderr, flush=True)
    return 2


def compare_main(args: argparse.Namespace) -> int:
    """segment.py --compare: each pair through hemorrhage_progression, both visits' files, the pair's files."""
    paths = [Path(p) for p in args.paths]
    if len(paths) % 2 or any(not p.is_file() for p in paths):
        return usage_error("--compare takes photo files in pairs: BASELINE FOLLOW_UP [BASELINE FOLLOW_UP ...]")
    try:
        photos = {p: p.read_bytes() for p in paths}
        args.output.mkdir(parents=True, exist_ok=True)
        client = service.make_client(args.url, args.protocol, args.timeout)
        service.check_server(client, args.protocol, args.url, min(args.timeout, 10.0))
        if not client.is_model_ready(PROGRESSION):
            return usage_error(f"model {PROGRESSION!r} is not ready at {args.url}")
    except service.ServerNotReady as exc:
        return usage_error(str(exc))
    except OSError as exc:
        return usage_error(f"{exc.filename or args.output}: {exc.strerror or exc}")
    unique = list(dict.fromkeys(paths))
    names = dict(zip(unique, output_names(unique)))
    pairs = list(zip(paths[::2], paths[1::2]))
    visits, comparisons, failures = {}, [], 0
    for start in range(0, len(pairs), MAX_PAIRS):
        chunk = pairs[start:start + MAX_PAIRS]
        answers = progression_client.compare(client, args.protocol, [(photos[b], photos[f]) for b, f in chunk],
                                             args.timeout)
        for (b, f), answer in zip(chunk, answers):
            for path, result in ((b, answer.baseline), (f, answer.follow_up)):
                if path not in visits:
                    photo = Photo(path, names[path], len(visits))
                    out = PhotoOutput(photo, True, result.report, result.mask_png) if result.ok else \
                        failed(photo, result.error, report=result.report)
                    visits[path] = finish_one(out, args.output, photos[path])
            name = f"{names[b]}_vs_{names[f]}"
            files, notes = write_comparison(args.output, name, (str(b), str(f)), (photos[b], photos[f]), answer)
            change = answer.change_report
            comparisons.append({"name": name, "baseline": b.name, "follow_up": f.name, "change": change,
                                "files": files})
            registration = change.get("registration") or {}
            if change.get("status") == "ok":
                print(f"{b.name} -> {f.name}: {change['summary']}, compared field "
                      f"{change['compared_field']['overlap_fraction']:.0%}" + "".join(f"; {n}" for n in notes))
            else:
                failures += 1
                print(f"{b.name} -> {f.name}: NOT COMPARED ({registration.get('status')}): "
                      f"{registration.get('reason') or change.get('error')}")
    rows = [index_row(r, args.output) for r in sorted(visits.values(), key=lambda r: r.photo.index)]
    index = write_index(args.output, rows, comparisons)
    print(f"{len(pairs) - failures} of {len(pairs)} pairs compared; overview: {index}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare_main(args)
    try:
        photos = collect_photos(args.paths, exclude=args.output)
    except UsageError as exc:
        return usage_error(str(exc))
    if not photos:
        return usage_error(f"no photos found in {' '.join(args.paths)} (looked for {' '.join(PHOTO_EXTENSIONS)})")
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return usage_error(f"cannot create the output folder {args.output}: {exc.strerror or exc}")
    try:
        probe = service.make_client(args.url, args.protocol, args.timeout)
        service.check_server(probe, args.protocol, args.url, min(args.timeout, 10.0))
    except service.ServerNotReady as exc:
        return usage_error(str(exc))
    except Exception as exc:  # e.g. a malformed --url rejected by the client library
        reason = service.error_text(exc)
        return usage_error(f"cannot connect to Triton at {args.url} over {args.protocol}: {reason}")

    local = threading.local()

    def run(batch: list[Photo]) -> list[PhotoOutput]:
        if getattr(local, "client", None) is None:
            local.client = service.make_client(args.url, args.protocol, args.timeout)
        try:
            return process_batch(local.client, args.protocol, batch, args.probability, args.timeout, args.output,
                                 service.routing_parameters(args.routing_key, args.unet_version))
        except Exception as exc:  # a bug must not lose the rest of the run
            return [failed(p, f"internal error: {service.error_text(exc)}") for p in batch]

    from tqdm import tqdm

    batches = [photos[i:i + args.batch_size] for i in range(0, len(photos), args.batch_size)]
    results: list[PhotoOutput] = []
    pool = ThreadPoolExecutor(max_workers=min(args.concurrency, len(batches)))
    try:
        with tqdm(total=len(photos), unit="photo", desc="Segmenting", dynamic_ncols=True) as bar:
            for future in as_completed([pool.submit(run, b) for b in batches]):
                done = future.result()
                results.extend(done)
                bar.update(len(done))
                bar.set_postfix(failed=sum(not r.ok for r in results), refresh=False)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        print("segment.py: interrupted; photos already written are complete", file=sys.stderr, flush=True)
        return 130
    pool.shutdown()

    from rich.console import Console

    results.sort(key=lambda r: r.photo.index)
    try:
        index = write_index(args.output, [index_row(r, args.output) for r in results])
    except OSError as exc:
        index = f"not written ({exc.strerror or exc})"
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(summary_table(results))
    failures = sum(not r.ok for r in results)
    console.print(f"{len(results) - failures} of {len(results)} photos segmented"
                  + (f", [red]{failures} failed[/red]" if failures else "")
                  + f"; outputs in {escape(str(args.output))}, overview: {escape(str(index))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
