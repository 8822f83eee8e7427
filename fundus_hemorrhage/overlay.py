"""The picture a doctor looks at: the photo with the lesions outlined, coloured by ETDRS zone, the ETDRS grid,
the optic disc outline and the fovea, and a legend. Pure drawing (OpenCV) from a photo, its mask and its report
(schema 2.0); segment.py writes it as <stem>_overlay.png.

Everything is drawn from the report's own numbers (fovea, disc centre and diameter, scale, each lesion's
`etdrs_subfield`), so the picture shows exactly what the report says. The grid: circles of radius 500, 1500 and
3000 um around the fovea (converted to pixels with the report's scale: disc diameter = 1800 um, an approximation),
and the four sector boundaries at 45 degrees to the fovea-disc axis, from the central circle to the outer one.
Without a retinal frame (disc or fovea not found) the lesions are outlined in one colour and the legend says why.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .retinal_frame import ETDRS_RADII_UM, RetinalFrame

# BGR; colours that stand out on the red-orange fundus and from each other.
ZONE_COLOURS = {
    "central": (255, 0, 255),  # magenta
    "inner": (0, 255, 255),  # yellow
    "outer": (255, 90, 0),  # blue
    "outside": (255, 255, 0),  # cyan
}
ZONE_LABELS = {"central": "central subfield (< 0.5 mm)", "inner": "inner ring (0.5-1.5 mm)",
               "outer": "outer ring (1.5-3 mm)", "outside": "outside the ETDRS grid"}
UNZONED_BGR = (255, 255, 0)  # cyan: the lesion outline when there is no retinal frame (as schema 1.0's overlay)
GRID_BGR = (255, 255, 255)
DISC_BGR = (0, 255, 0)
FOVEA_BGR = (0, 0, 255)  # red cross


def zone_of(subfield: str | None) -> str | None:
    """ETDRS subfield -> the colour zone: central, inner, outer, outside (None without a frame)."""
    return None if subfield is None else subfield.split("_")[0]


def stroke(shape: tuple[int, ...]) -> int:
    """Line thickness for a photo of this shape: 2 px per 1000 px of its longer side, at least 2."""
    return max(2, int(round(max(shape[:2]) / 1000)))


def frame_of(report: dict) -> RetinalFrame | None:
    """The report's retinal frame (fovea, disc, its diameter, EXIF orientation), or None when it has none."""
    disc, fovea = report.get("optic_disc"), report.get("fovea")
    if not disc or not fovea or not report.get("scale"):
        return None
    return RetinalFrame(fovea["center"]["x"], fovea["center"]["y"], disc["center"]["x"], disc["center"]["y"],
                        disc["diameter_px"], int(report.get("image", {}).get("exif_orientation", 1)))


def outline_lesions(image: np.ndarray, mask: np.ndarray, report: dict | None, default=UNZONED_BGR) -> None:
    """Each lesion's outline, centred on its edge, in its zone's colour (`draw_overlay` then restores the lesion's
    own pixels, so the stroke lies just outside it)."""
    lesion_pixels = mask > 0
    width = 2 * stroke(image.shape)
    lesions = (report or {}).get("lesions") or []
    if not any(les.get("etdrs_subfield") for les in lesions):
        contours, _ = cv2.findContours(lesion_pixels.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, default, thickness=width, lineType=cv2.LINE_8)
    else:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(lesion_pixels.astype(np.uint8), connectivity=8)
        by_box = {tuple(s): k for k, s in enumerate(stats.tolist()) if k}
        for les in lesions:
            b = les["bbox"]
            k = by_box.get((b["x"], b["y"], b["width"], b["height"], les["area_px"]))
            if k is None:  # the mask and the report disagree: outline nothing rather than the wrong pixels
                continue
            own = (labels[b["y"]:b["y"] + b["height"], b["x"]:b["x"] + b["width"]] == k).astype(np.uint8)
            contours, _ = cv2.findContours(own, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                           offset=(b["x"], b["y"]))
            colour = ZONE_COLOURS.get(zone_of(les.get("etdrs_subfield")), default)
            cv2.drawContours(image, contours, -1, colour, thickness=width, lineType=cv2.LINE_8)


def _point(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def draw_grid(image: np.ndarray, frame: RetinalFrame) -> None:
    """ETDRS circles and sector boundaries around the fovea, the disc outline and the fovea's cross."""
    t = stroke(image.shape)
    f = (frame.fovea_x, frame.fovea_y)
    radii = [frame.ring_radius_px(r) for r in ETDRS_RADII_UM]
    for r in radii:
        cv2.circle(image, _point(*f), int(round(r)), GRID_BGR, t, cv2.LINE_AA)
    (nx, ny), (sx, sy) = frame.nasal, frame.superior
    for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1)):  # the diagonals between the sectors
        dx, dy = (a * nx + b * sx) / math.sqrt(2), (a * ny + b * sy) / math.sqrt(2)
        cv2.line(image, _point(f[0] + dx * radii[0], f[1] + dy * radii[0]),
                 _point(f[0] + dx * radii[2], f[1] + dy * radii[2]), GRID_BGR, t, cv2.LINE_AA)
    scale = max(0.6, image.shape[1] / 2500)
    for letter, (vx, vy) in (("S", (sx, sy)), ("N", (nx, ny)), ("I", (-sx, -sy)), ("T", (-nx, -ny))):
        r = (radii[1] + radii[2]) / 2
        _label(image, letter, _point(f[0] + vx * r, f[1] + vy * r), scale, GRID_BGR, centre=True)
    cv2.circle(image, _point(frame.disc_x, frame.disc_y), int(round(frame.disc_diameter_px / 2)), DISC_BGR, t,
               cv2.LINE_AA)
    arm = max(10, int(round(radii[0] / 2)))
    cx, cy = _point(*f)
    cv2.line(image, (cx - arm, cy), (cx + arm, cy), FOVEA_BGR, t, cv2.LINE_AA)
    cv2.line(image, (cx, cy - arm), (cx, cy + arm), FOVEA_BGR, t, cv2.LINE_AA)


def _label(image, text, origin, scale, colour, centre=False) -> None:
    thickness = max(1, int(round(scale * 2)))
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x, y = (origin[0] - w // 2, origin[1] + h // 2) if centre else origin
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 3, cv2.LINE_AA)
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def legend_lines(report: dict) -> list[tuple[tuple[int, int, int] | None, str]]:
    """(swatch colour or None, text) rows of the legend."""
    eye = (report.get("eye") or {}).get("laterality", "unknown")
    rows: list[tuple[tuple[int, int, int] | None, str]] = [(None, f"Eye: {eye}")]
    etdrs = report.get("etdrs")
    if etdrs:
        counts = {zone: 0 for zone in ZONE_COLOURS}
        for name, entry in etdrs.items():
            counts[zone_of(name)] += entry["count"]
        rows += [(ZONE_COLOURS[z], f"{ZONE_LABELS[z]}: {counts[z]}") for z in ZONE_COLOURS]
        rows += [(DISC_BGR, "optic disc"), (FOVEA_BGR, "fovea"),
                 (GRID_BGR, "ETDRS grid, 1 disc diameter = 1.8 mm (assumed)")]
    else:
        reasons = report.get("anatomy_reasons") or {}
        why = reasons.get("optic_disc") or reasons.get("fovea") or reasons.get("retinal_frame") or "not available"
        rows += [(UNZONED_BGR, f"lesions: {len((report.get('lesions') or []))}"),
                 (None, f"No retinal frame: {why}")]
        if report.get("optic_disc"):
            rows.append((DISC_BGR, "optic disc"))
        if report.get("fovea"):
            rows.append((FOVEA_BGR, "fovea"))
    return rows


def draw_legend(image: np.ndarray, report: dict) -> None:
    """The legend box in the photo's top-left corner (outside the round field of view on most cameras)."""
    draw_legend_rows(image, legend_lines(report))


def draw_legend_rows(image: np.ndarray, rows: list[tuple[tuple[int, int, int] | None, str]],
                     width_per_scale: float = 3500) -> None:
    """A legend box of (swatch colour or None, text) rows in the image's top-left corner, on a darkened
    background; text scaled to the image's width / `width_per_scale`."""
    scale = max(0.5, image.shape[1] / width_per_scale)
    thickness = max(1, int(round(scale * 2)))
    line = int(cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][1] * 2.0)
    width = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] for _, t in rows) + 3 * line
    height = line * len(rows) + line // 2
    x0 = y0 = max(4, line // 3)
    box = image[y0:y0 + height, x0:x0 + width]
    box[:] = (box * 0.35).astype(np.uint8)  # darken, so the text reads on any background
    for i, (colour, text) in enumerate(rows):
        y = y0 + line * (i + 1)
        if colour is not None:
            cv2.rectangle(image, (x0 + line // 3, y - line // 2), (x0 + line, y), colour, -1)
        cv2.putText(image, text, (x0 + int(1.4 * line), y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)


def draw_overlay(image: np.ndarray, mask: np.ndarray, report: dict | None = None,
                 colour: tuple[int, int, int] = UNZONED_BGR) -> np.ndarray:
    """BGR photo (as stored) + its 0/255 mask + its report -> the overlay (a new array, same size).

    Without a report: the lesion outlines only, in `colour`. Raises ValueError when the mask's size is not the
    photo's.
    """
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the photo decodes as "
                         f"{image.shape[1]}x{image.shape[0]}")
    out = image.copy()
    frame = frame_of(report) if report else None
    if frame is not None:
        draw_grid(out, frame)
    elif report:
        t = stroke(out.shape)
        if report.get("optic_disc"):
            d = report["optic_disc"]
            cv2.circle(out, _point(d["center"]["x"], d["center"]["y"]), int(round(d["diameter_px"] / 2)), DISC_BGR,
                       t, cv2.LINE_AA)
        if report.get("fovea"):
            cv2.drawMarker(out, _point(report["fovea"]["center"]["x"], report["fovea"]["center"]["y"]), FOVEA_BGR,
                           cv2.MARKER_CROSS, max(20, 10 * t), t)
    outline_lesions(out, mask, report, colour)
    lesion_pixels = mask > 0
    out[lesion_pixels] = image[lesion_pixels]  # the lesions themselves stay visible, under strokes and grid alike
    if report:
        draw_legend(out, report)
    return out
