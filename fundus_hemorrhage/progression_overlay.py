"""The pictures of a comparison between two visits (segment.py --compare): pure drawing (OpenCV) from both photos,
both masks and reports, and the change report.

    side_by_side       the two visits' overlays (fundus_hemorrhage.overlay), same height, labelled
    difference_picture the follow-up registered onto the baseline (the change report's transform) as a two-colour
                       composite (baseline green channel in red and blue, follow-up's in green: where they agree
                       the photo is grey, what darkened at the follow-up is magenta, what darkened at the baseline
                       green, and a misregistration shows as coloured fringes along the vessels), with each change outlined:
                       new lesions yellow, resolved cyan, enlarged orange, shrunk blue, unchanged white,
                       uncertain grey

Pictures are drawn at `scale` of the baseline's size (default 1/2), enough to see lesions of 0.01 mm2 (~600 px).
"""

from __future__ import annotations

import cv2
import numpy as np

from .overlay import draw_legend_rows, draw_overlay, stroke
from .registration import Transform

CHANGE_BGR = {"new": (0, 255, 255), "resolved": (255, 255, 0), "enlarged": (0, 140, 255), "shrunk": (255, 90, 0),
              "unchanged": (255, 255, 255), "uncertain": (160, 160, 160)}


def lesion_contours(mask: np.ndarray, report: dict) -> dict[int, list[np.ndarray]]:
    """Report lesion id -> its outline contours (photo pixels), components found by bounding box and area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    by_box = {tuple(s): k for k, s in enumerate(stats.tolist()) if k}
    out = {}
    for les in report.get("lesions") or []:
        b = les["bbox"]
        k = by_box.get((b["x"], b["y"], b["width"], b["height"], les["area_px"]))
        if k is None:
            continue
        own = (labels[b["y"]:b["y"] + b["height"], b["x"]:b["x"] + b["width"]] == k).astype(np.uint8)
        contours, _ = cv2.findContours(own, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(b["x"], b["y"]))
        out[les["id"]] = contours
    return out


def register_image(follow_up: np.ndarray, transform: Transform, baseline_size: tuple[int, int],
                   scale: float = 0.5) -> np.ndarray:
    """The follow-up photo resampled onto the baseline's pixel grid (at `scale`): each output pixel takes the
    follow-up's pixel the inverse of `transform` (follow-up -> baseline) points to."""
    w, h = baseline_size
    ow, oh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    inverse = transform.inverted((follow_up.shape[1], follow_up.shape[0]))
    step = 8  # the maps are smooth: computed every 8 output pixels, interpolated bilinearly between the nodes
    gx, gy = np.meshgrid(np.arange(0, ow + step, step), np.arange(0, oh + step, step))
    points = np.c_[gx.ravel(), gy.ravel()].astype(np.float64)
    q = inverse.apply((points + 0.5) / scale - 0.5).astype(np.float32)
    ux, uy = np.meshgrid(np.arange(ow, dtype=np.float32) / step, np.arange(oh, dtype=np.float32) / step)
    mx = cv2.remap(q[:, 0].reshape(gx.shape), ux, uy, cv2.INTER_LINEAR)
    my = cv2.remap(q[:, 1].reshape(gx.shape), ux, uy, cv2.INTER_LINEAR)
    return cv2.remap(follow_up, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def difference_picture(baseline: np.ndarray, follow_up: np.ndarray, baseline_mask: np.ndarray,
                       follow_up_mask: np.ndarray, baseline_report: dict, follow_up_report: dict,
                       change_report: dict, scale: float = 0.5) -> np.ndarray:
    """The registered two-colour composite with the changes outlined (module docstring). Raises ValueError when
    the change report has no transform (a refused pair)."""
    transform_data = (change_report.get("registration") or {}).get("transform")
    if not transform_data:
        raise ValueError(f"no registration: {(change_report.get('registration') or {}).get('reason')}")
    transform = Transform.from_report(transform_data)
    h, w = baseline.shape[:2]
    small = cv2.resize(baseline, (int(round(w * scale)), int(round(h * scale))), interpolation=cv2.INTER_AREA)
    moved = register_image(follow_up, transform, (w, h), scale)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    g0, g1 = clahe.apply(small[:, :, 1]), clahe.apply(moved[:, :, 1])
    out = cv2.merge([g0, g1, g0])  # B, G, R: baseline magenta, follow-up green
    t = max(1, stroke(out.shape) // 2 + 1)
    b_contours = lesion_contours(baseline_mask, baseline_report)
    f_contours = lesion_contours(follow_up_mask, follow_up_report)
    for entry in change_report.get("lesions") or []:
        colour = CHANGE_BGR[entry["change"]]
        for i in entry["baseline_ids"]:
            for c in b_contours.get(i, []):
                cv2.polylines(out, [np.rint((c.reshape(-1, 2) + 0.5) * scale - 0.5).astype(np.int32)], True,
                              colour, t, cv2.LINE_AA)
        for j in entry["follow_up_ids"]:
            for c in f_contours.get(j, []):
                mapped = transform.apply(c.reshape(-1, 2).astype(np.float64))
                cv2.polylines(out, [np.rint((mapped + 0.5) * scale - 0.5).astype(np.int32)], True, colour,
                              t if entry["change"] == "new" else max(1, t - 1), cv2.LINE_AA)
    summary = change_report.get("summary") or {}
    overlap = (change_report.get("compared_field") or {}).get("overlap_fraction")
    rows = [(None, "registered; magenta: darker at follow-up, green: darker at baseline")]
    rows += [(CHANGE_BGR[k], f"{k}: {summary.get(k, 0)}") for k in CHANGE_BGR]
    if overlap is not None:
        rows.append((None, f"compared field: {overlap:.0%} of the baseline's"))
    draw_legend_rows(out, rows, width_per_scale=2400)
    return out


def side_by_side(baseline: np.ndarray, follow_up: np.ndarray, baseline_mask: np.ndarray, follow_up_mask: np.ndarray,
                 baseline_report: dict, follow_up_report: dict, height: int = 1424) -> np.ndarray:
    """Both visits' overlays (ETDRS-coloured lesions, grid, disc, fovea, legend), scaled to `height`, side by
    side with a label above each. Raises ValueError when a mask's size is not its photo's."""
    panels = []
    for image, mask, report, label in ((baseline, baseline_mask, baseline_report, "baseline"),
                                       (follow_up, follow_up_mask, follow_up_report, "follow-up")):
        overlay = draw_overlay(image, mask, report)
        f = height / overlay.shape[0]
        panel = cv2.resize(overlay, (int(round(overlay.shape[1] * f)), height), interpolation=cv2.INTER_AREA)
        bar = np.zeros((max(30, height // 24), panel.shape[1], 3), np.uint8)
        scale = bar.shape[0] / 40
        cv2.putText(bar, label, (10, int(bar.shape[0] * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, int(round(scale * 2))), cv2.LINE_AA)
        panels.append(np.vstack([bar, panel]))
    gap = np.zeros((panels[0].shape[0], 8, 3), np.uint8)
    return np.hstack([panels[0], gap, panels[1]])
