#!/usr/bin/env python3
"""Find haemorrhages in retinal fundus photographs with the hemorrhage_segmentation service (Triton).

    python segment.py PATH [PATH ...] --output DIR [--url HOST:PORT] [--protocol grpc|http]
                      [--batch-size 8] [--probability] [--concurrency 2] [--timeout S]

PATH is a photo or a folder; folders are searched recursively for .jpg .jpeg .png .tif .tiff .bmp files
(hidden files and the output folder are skipped). A photo named explicitly is sent whatever its extension.

For each photo, DIR receives (<stem> is the file name without extension; if two photos share a stem, the
extension, then a counter, is appended to keep their outputs apart):
  <stem>_mask.png         8-bit mask at the photo's own size: 255 = haemorrhage, 0 = background
  <stem>_overlay.png      the photo with the lesion outlines drawn in cyan
  <stem>_lesions.json     the lesion report (lesions, totals, quadrants, field of view, model, threshold),
                          or for a photo that failed {"status": "error", "error": reason}
  <stem>_probability.png  with --probability: round(255 * p) per pixel
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
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # keep grpc's C-core log lines off the clinic's console

import cv2  # noqa: E402
import numpy as np  # noqa: E402

MODEL = "hemorrhage_segmentation"
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
MAX_BATCH = 16  # the ensemble's max_batch_size
OUTLINE_BGR = (255, 255, 0)  # cyan: stands out on the red-orange fundus
_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]


class UsageError(Exception):
    """Something the user must fix before anything can be segmented (exit status 2)."""


@dataclass
class Photo:
    path: Path
    name: str  # output stem, unique within the run
    index: int = 0  # position in the run, for the summary order


@dataclass
class PhotoResult:
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


# ----------------------------------------------------------------------------------------------- client

def normalise_url(url: str | None, protocol: str) -> str:
    if not url:
        return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
    return re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", url).rstrip("/")


def client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def make_client(url: str, protocol: str = "grpc", timeout: float = 300.0):
    """A tritonclient InferenceServerClient (not shared between threads)."""
    module = client_module(protocol)
    if protocol == "grpc":
        return module.InferenceServerClient(url=url)
    return module.InferenceServerClient(url=url, connection_timeout=min(timeout, 10.0), network_timeout=timeout)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_server(client, protocol: str, url: str, timeout: float = 10.0) -> None:
    """UsageError with a one-line reason unless the server is live and the model ready."""
    kwargs = {"client_timeout": timeout} if protocol == "grpc" else {}
    try:
        live = client.is_server_live(**kwargs)
    except Exception as exc:  # connection refused, DNS, TLS, timeout: all mean "not reachable"
        raise UsageError(f"cannot reach Triton at {url} over {protocol}: {error_text(exc)}") from None
    if not live:
        raise UsageError(f"Triton at {url} ({protocol}) is not live")
    try:
        ready = client.is_model_ready(MODEL, **kwargs)
    except Exception as exc:
        raise UsageError(f"cannot ask Triton at {url} about model {MODEL!r}: {error_text(exc)}") from None
    if not ready:
        raise UsageError(f"Triton at {url} ({protocol}) is up but model {MODEL!r} is not ready")


def error_text(exc: BaseException) -> str:
    """The server's reason for a failed call, without transport prefixes; one line."""
    message = exc.message() if callable(getattr(exc, "message", None)) else None
    text = message or str(exc) or type(exc).__name__
    text = one_line(text)
    if "failed to connect to all addresses" in text or "Connection refused" in text:
        return "connection refused"
    return text


def photo_reason(text: str) -> str:
    """'in ensemble 'x', image 0: not an image file' -> 'not an image file'."""
    text = re.sub(r"^in ensemble '[^']*', ", "", text)
    return re.sub(r"^image \d+: ", "", text)


def server_unavailable(exc: BaseException) -> bool:
    """True when the failure is the server being gone, so retrying photo by photo is pointless."""
    status = getattr(exc, "status", None)
    status = status() if callable(status) else status
    if status is not None and "UNAVAILABLE" in str(status):
        return True
    return isinstance(exc, ConnectionError)


def segment_batch(client, protocol: str, images: list[bytes], probability: bool = False,
                  timeout: float | None = None) -> list[tuple[bytes, dict, bytes]]:
    """One request: (MASK bytes, LESIONS report, PROBABILITY bytes) per image. Raises if the request fails."""
    module = client_module(protocol)
    data = np.empty((len(images), 1), dtype=np.object_)
    data[:, 0] = images
    inp = module.InferInput("IMAGE", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(data)
    names = ["MASK", "LESIONS"] + (["PROBABILITY"] if probability else [])
    outputs = [module.InferRequestedOutput(n) for n in names]
    kwargs = {"parameters": {"probability": True}} if probability else {}
    if protocol == "grpc" and timeout:
        kwargs["client_timeout"] = timeout
    result = client.infer(MODEL, [inp], outputs=outputs, **kwargs)
    masks = result.as_numpy("MASK").reshape(-1)
    reports = result.as_numpy("LESIONS").reshape(-1)
    probs = result.as_numpy("PROBABILITY").reshape(-1) if probability else [b""] * len(images)
    if not (len(masks) == len(reports) == len(probs) == len(images)):
        raise RuntimeError(f"malformed reply: {len(masks)} masks, {len(reports)} reports for {len(images)} photos")
    out = []
    for mask, report, prob in zip(masks, reports, probs):
        try:
            parsed = json.loads(report)
        except (TypeError, ValueError):
            parsed = {"status": "error", "error": "malformed lesion report from the server"}
        out.append((bytes(mask), parsed, bytes(prob)))
    return out


def client_error_report(reason: str) -> dict:
    return {"schema_version": "1.0", "status": "error", "error": reason}


def failed(photo: Photo, reason: str, seconds: float = 0.0, report: dict | None = None) -> PhotoResult:
    return PhotoResult(photo, False, report or client_error_report(reason), error=reason, seconds=seconds)


def process_batch(client, protocol: str, photos: list[Photo], probability: bool, timeout: float,
                  output: Path) -> list[PhotoResult]:
    """Segment `photos` in one request (retried photo by photo if refused) and write their outputs."""
    readable, images, results = [], [], []
    for photo in photos:
        try:
            images.append(photo.path.read_bytes())
            readable.append(photo)
        except OSError as exc:
            results.append(finish_one(failed(photo, f"cannot read the file: {exc.strerror or exc}"), output))
    if not readable:
        return results
    start = time.monotonic()
    try:
        outcomes = segment_batch(client, protocol, images, probability, timeout)
    except Exception as exc:
        if len(readable) > 1 and not server_unavailable(exc):
            for photo in readable:
                results.extend(process_batch(client, protocol, [photo], probability, timeout, output))
            return results
        reason = photo_reason(error_text(exc)) if len(readable) == 1 else f"request failed: {error_text(exc)}"
        share = (time.monotonic() - start) / len(readable)
        results.extend(finish_one(failed(p, reason, share), output) for p in readable)
        return results
    share = (time.monotonic() - start) / len(readable)
    for photo, data, (mask, report, prob) in zip(readable, images, outcomes):
        if report.get("status") != "ok":
            reason = photo_reason(str(report.get("error") or "the server reported an error"))
            results.append(finish_one(failed(photo, reason, share, report), output))
        elif not mask:
            results.append(finish_one(failed(photo, "the server returned no mask", share, report), output))
        else:
            result = PhotoResult(photo, True, report, mask, prob, seconds=share)
            results.append(finish_one(result, output, data))
    return results


def finish_one(result: PhotoResult, output: Path, photo_bytes: bytes | None = None) -> PhotoResult:
    start = time.monotonic()
    try:
        write_outputs(result, output, photo_bytes)
    except OSError as exc:
        result.ok = False
        result.error = f"could not write the outputs: {exc.strerror or exc}"
    result.seconds += time.monotonic() - start
    return result


# ----------------------------------------------------------------------------------------------- outputs

def output_paths(output: Path, name: str) -> dict[str, Path]:
    return {kind: output / f"{name}_{kind}.{'json' if kind == 'lesions' else 'png'}"
            for kind in ("mask", "overlay", "lesions", "probability")}


def write_file(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interrupted run leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_outputs(result: PhotoResult, output: Path, photo_bytes: bytes | None = None) -> None:
    """Mask, overlay, report (and probability) of one photo; for a failure the error report only."""
    paths = output_paths(output, result.photo.name)
    report = dict(result.report, source=str(result.photo.path))
    write_file(paths["lesions"], (json.dumps(report, indent=2) + "\n").encode())
    if not result.ok:  # don't leave an earlier run's mask next to a report that says "error"
        for kind in ("mask", "overlay", "probability"):
            paths[kind].unlink(missing_ok=True)
        return
    write_file(paths["mask"], result.mask)
    if result.probability:
        write_file(paths["probability"], result.probability)
    if photo_bytes is None:
        photo_bytes = result.photo.path.read_bytes()
    try:
        overlay = draw_overlay(photo_bytes, result.mask)
    except ValueError as exc:
        paths["overlay"].unlink(missing_ok=True)
        result.notes.append(f"no overlay: {exc}")
        return
    ok, buf = cv2.imencode(".png", overlay, _PNG_FAST)
    if not ok:
        result.notes.append("no overlay: PNG encoding failed")
        return
    write_file(paths["overlay"], buf.tobytes())


def decode_photo(photo_bytes: bytes) -> np.ndarray:
    """8-bit BGR pixels as stored (EXIF orientation not applied, like the server)."""
    buf = np.frombuffer(photo_bytes, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if buf.size else None
    if image is None:
        raise ValueError("the photo could not be decoded locally")
    return image


def outline_thickness(shape: tuple[int, ...]) -> int:
    return max(2, int(round(max(shape[:2]) / 1000)))


def draw_overlay(photo_bytes: bytes, mask_png: bytes, colour: tuple[int, int, int] = OUTLINE_BGR) -> np.ndarray:
    """The photo at full size with each lesion outlined just outside its edge (the lesion stays visible)."""
    image = decode_photo(photo_bytes)
    mask = cv2.imdecode(np.frombuffer(mask_png, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError("the mask could not be decoded")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the photo decodes as "
                         f"{image.shape[1]}x{image.shape[0]}")
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return image
    lesion = mask > 0
    original = image[lesion]
    cv2.drawContours(image, contours, -1, colour, thickness=2 * outline_thickness(image.shape), lineType=cv2.LINE_8)
    image[lesion] = original  # keep the inner half of the stroke off the lesion itself
    return image


# ----------------------------------------------------------------------------------------------- summary

def summary_table(results: list[PhotoResult]):
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
                   help=f"photos per request, 1..{MAX_BATCH} (default 8)")
    p.add_argument("--probability", action="store_true", help="also write <stem>_probability.png")
    p.add_argument("--concurrency", type=int, default=2, metavar="N", help="requests in flight (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for one request (default 300)")
    args = p.parse_args(argv)
    if not 1 <= args.batch_size <= MAX_BATCH:
        p.error(f"--batch-size must be between 1 and {MAX_BATCH}")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if not args.timeout > 0:
        p.error("--timeout must be positive")
    args.url = normalise_url(args.url, args.protocol)
    return args


def usage_error(message: str) -> int:
    print(f"segment.py: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        check_server(make_client(args.url, args.protocol, args.timeout), args.protocol, args.url,
                     min(args.timeout, 10.0))
    except UsageError as exc:
        return usage_error(str(exc))
    except Exception as exc:  # e.g. a malformed --url rejected by the client library
        return usage_error(f"cannot connect to Triton at {args.url} over {args.protocol}: {error_text(exc)}")

    local = threading.local()

    def run(batch: list[Photo]) -> list[PhotoResult]:
        if getattr(local, "client", None) is None:
            local.client = make_client(args.url, args.protocol, args.timeout)
        try:
            return process_batch(local.client, args.protocol, batch, args.probability, args.timeout, args.output)
        except Exception as exc:  # a bug must not lose the rest of the run
            return [failed(p, f"internal error: {error_text(exc)}") for p in batch]

    from tqdm import tqdm

    batches = [photos[i:i + args.batch_size] for i in range(0, len(photos), args.batch_size)]
    results: list[PhotoResult] = []
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
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(summary_table(results))
    failures = sum(not r.ok for r in results)
    console.print(f"{len(results) - failures} of {len(results)} photos segmented"
                  + (f", [red]{failures} failed[/red]" if failures else "")
                  + f"; outputs in {escape(str(args.output))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
