"""Custom Prometheus metrics of the service, through the Python backend's metrics API (pb_utils.MetricFamily),
shown on Triton's /metrics (port 8002) beside Triton's own per-version nv_inference_* counters.

    hemoseg_routed_photos_total{version, route}        counter: photos the unet_router sent to each unet version;
                                                        route = pinned | key | random | newest
    hemoseg_lesions_per_photo{version}                 histogram: lesions in each report (postprocess)
    hemoseg_hemorrhage_area_fov_fraction{version}      histogram: haemorrhage area / field-of-view area per photo
    hemoseg_shadow_dice{served, shadow}                histogram: mask Dice, served vs shadow version (working grid)
    hemoseg_shadow_lesion_count_diff{served, shadow}   histogram: shadow minus served lesion count per photo
    hemoseg_shadow_photos_total{served, shadow}        counter: photos the shadow version ran on
    hemoseg_shadow_ms_total{shadow}                    counter: wall ms spent in shadow inferences (their cost)
    hemoseg_shadow_skipped_total{shadow}               counter: sampled requests skipped because a shadow
                                                        inference was still in flight (the bound)

Triton 2.51's Python backend has COUNTER, GAUGE and HISTOGRAM (checked on the server: tests/test_ab_server.py).
Every instance of a model creates the same families; Triton keeps one family per name and one series per label
set, so instances add to the same series. Must be called inside a Triton Python model (imports pb_utils lazily).
"""

from __future__ import annotations

# Buckets (upper bounds). Lesions per photo: IDRiD photos with haemorrhages have ~1-100 components.
LESION_BUCKETS = [0, 1, 2, 3, 5, 10, 20, 50, 100]
# Area as a fraction of the field of view: 1e-5 is a few working-grid pixels, 0.1 a massive bleed.
AREA_BUCKETS = [0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1]
DICE_BUCKETS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0]
COUNT_DIFF_BUCKETS = [-10, -5, -2, -1, 0, 1, 2, 5, 10]


def _pb():
    import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

    return pb_utils


class _Family:
    """One metric family; `metric(**labels)` caches one series per label set."""

    def __init__(self, name: str, description: str, kind: str, buckets: list[float] | None = None):
        pb = _pb()
        self.family = pb.MetricFamily(name=name, description=description, kind=getattr(pb.MetricFamily, kind))
        self.buckets, self.series = buckets, {}

    def metric(self, **labels):
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        if key not in self.series:
            labels = dict(key)
            self.series[key] = (self.family.Metric(labels=labels, buckets=self.buckets) if self.buckets is not None
                                else self.family.Metric(labels=labels))
        return self.series[key]


class LesionMetrics:
    """Per-version distribution of the reports' lesion count and haemorrhage area (postprocess)."""

    def __init__(self):
        self.lesions = _Family("hemoseg_lesions_per_photo", "Lesions in each report, per unet version",
                               "HISTOGRAM", LESION_BUCKETS)
        self.area = _Family("hemoseg_hemorrhage_area_fov_fraction",
                            "Haemorrhage area / field-of-view area of each photo, per unet version",
                            "HISTOGRAM", AREA_BUCKETS)

    def record(self, report: dict) -> None:
        """One photo's report (status ok); others are ignored."""
        if report.get("status") != "ok":
            return
        version = report.get("model", {}).get("version", "")
        totals = report.get("totals", {})
        self.lesions.metric(version=version).observe(float(totals.get("count", 0)))
        self.area.metric(version=version).observe(float(totals.get("area_fov_fraction", 0.0)))


class RouterMetrics:
    """The unet_router's counters and the shadow comparison."""

    def __init__(self):
        self.routed = _Family("hemoseg_routed_photos_total", "Photos the unet_router sent to each unet version",
                              "COUNTER")
        self.dice = _Family("hemoseg_shadow_dice", "Mask Dice of the served vs the shadow unet version per photo "
                            "(working grid, each at its own threshold)", "HISTOGRAM", DICE_BUCKETS)
        self.count_diff = _Family("hemoseg_shadow_lesion_count_diff",
                                  "Shadow minus served lesion count per photo (working grid)", "HISTOGRAM",
                                  COUNT_DIFF_BUCKETS)
        self.shadow_photos = _Family("hemoseg_shadow_photos_total", "Photos the shadow unet version ran on",
                                     "COUNTER")
        self.shadow_ms = _Family("hemoseg_shadow_ms_total", "Wall milliseconds spent in shadow inferences",
                                 "COUNTER")
        self.shadow_skipped = _Family("hemoseg_shadow_skipped_total", "Sampled requests not shadowed because a "
                                      "shadow inference was still in flight", "COUNTER")

    def route(self, version: int, route: str, photos: int) -> None:
        self.routed.metric(version=version, route=route).increment(photos)

    def shadow(self, served: int, shadow: int, agreements: list[tuple[float, int]], ms: float) -> None:
        for dice, diff in agreements:
            self.dice.metric(served=served, shadow=shadow).observe(dice)
            self.count_diff.metric(served=served, shadow=shadow).observe(diff)
        self.shadow_photos.metric(served=served, shadow=shadow).increment(len(agreements))
        self.shadow_ms.metric(shadow=shadow).increment(ms)

    def skipped(self, shadow: int) -> None:
        self.shadow_skipped.metric(shadow=shadow).increment(1)
