"""The files segment.py --compare writes for one pair of visits, next to each visit's own outputs:

    <name>_change.json           the change report (fundus_hemorrhage.progression), with both photos' paths
    <name>_side_by_side.jpg      both visits' overlays side by side (fundus_hemorrhage.progression_overlay)
    <name>_difference.png        the registered two-colour difference picture with the changes outlined
    <name>_difference_thumb.jpg  its small copy, for index.html

<name> is "<baseline stem>_vs_<follow-up stem>". A refused pair gets the change report and, when both photos
were segmented, the side-by-side picture; never a difference picture (there is no transform).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from .files import write_atomically
from .progression_overlay import difference_picture, side_by_side
from .report_index import THUMBNAIL_WIDTH
from .visits import PairAnswer

KINDS = {"change": "json", "side_by_side": "jpg", "difference": "png", "difference_thumb": "jpg"}


def comparison_paths(output: Path, name: str) -> dict[str, Path]:
    return {kind: Path(output) / f"{name}_{kind}.{ext}" for kind, ext in KINDS.items()}


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError("the photo could not be decoded locally")
    return image


def _mask(png: bytes) -> np.ndarray:
    mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE) if png else None
    if mask is None:
        raise ValueError("no mask")
    return mask


def write_comparison(output: Path, name: str, sources: tuple[str, str], photos: tuple[bytes, bytes],
                     answer: PairAnswer) -> tuple[dict[str, str], list[str]]:
    """Write one pair's files; (kind -> file name written, notes on pictures that could not be drawn).
    Raises OSError when a file cannot be written."""
    paths = comparison_paths(output, name)
    report = dict(answer.change_report, baseline_source=sources[0], follow_up_source=sources[1])
    write_atomically(paths["change"], (json.dumps(report, indent=2) + "\n").encode())
    written, notes = {"change": paths["change"].name}, []
    for kind in ("side_by_side", "difference", "difference_thumb"):  # no picture of an earlier run left behind
        paths[kind].unlink(missing_ok=True)
    if not (answer.baseline.ok and answer.follow_up.ok):
        return written, notes
    try:
        images = [_decode(p) for p in photos]
        masks = [_mask(answer.baseline.mask_png), _mask(answer.follow_up.mask_png)]
        picture = side_by_side(*images, *masks, answer.baseline.report, answer.follow_up.report)
    except ValueError as exc:
        return written, [f"no side-by-side picture: {exc}"]
    write_atomically(paths["side_by_side"], cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 88])[1].tobytes())
    written["side_by_side"] = paths["side_by_side"].name
    if answer.change_report.get("status") != "ok":
        return written, notes
    try:
        difference = difference_picture(*images, *masks, answer.baseline.report, answer.follow_up.report,
                                        answer.change_report)
    except ValueError as exc:
        return written, [f"no difference picture: {exc}"]
    write_atomically(paths["difference"], cv2.imencode(".png", difference, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())
    f = min(1.0, THUMBNAIL_WIDTH / difference.shape[1])
    thumb = cv2.resize(difference, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    write_atomically(paths["difference_thumb"], cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    written.update(difference=paths["difference"].name, difference_thumb=paths["difference_thumb"].name)
    return written, notes
