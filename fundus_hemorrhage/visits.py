"""A progression request's per-pair work, written once: the Triton model `hemorrhage_progression`
(model_repository/hemorrhage_progression/1/model.py) and the in-process evaluation
(fundus_hemorrhage_perf/registration_eval.py) both call it.

    pair_photos      BASELINE [N], FOLLOW_UP [N] bytes -> the 2N photos of one ensemble request (baselines first)
    register_pairs   the N registrations (keypoints of the 2N photos `pool`-parallel: OpenCV releases the GIL)
    answer_pairs     the ensemble's 2N PhotoResults + the registrations -> N PairAnswers (masks, both lesion
                     reports, change report)

Errors are data, as in the ensemble: a pair whose photo cannot be read, is ungradable, shows another eye or cannot
be registered is answered with a refused change report naming the reason; nothing here raises for a pair.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from .progression import Visit, change_report, error_change_report
from .registration import UNREADABLE, PhotoFeatures, Registration, fit_pair, photo_features, refused
from .report import PhotoResult

_log = logging.getLogger(__name__).error


@dataclass
class PairAnswer:
    """One pair's answer, as `hemorrhage_progression` returns it."""
    baseline: PhotoResult
    follow_up: PhotoResult
    change_report: dict


def pair_photos(baselines: Sequence[bytes], follow_ups: Sequence[bytes]) -> list[bytes]:
    """The photos of one ensemble request: baselines then follow-ups. Raises ValueError when the counts differ."""
    if len(baselines) != len(follow_ups):
        raise ValueError(f"BASELINE has {len(baselines)} photos and FOLLOW_UP {len(follow_ups)}: one follow-up per "
                         f"baseline is needed")
    return [*baselines, *follow_ups]


def _features(data) -> PhotoFeatures | str:
    try:
        if not isinstance(data, bytes):
            raise ValueError(f"expected image bytes, got {type(data).__name__}")
        return photo_features(data)
    except ValueError as exc:
        return str(exc)


def register_pairs(baselines: Sequence[bytes], follow_ups: Sequence[bytes], pool: Executor,
                   log: Callable[[str], None] = _log) -> list[Registration]:
    """Each follow-up registered to its baseline. Never raises: an unreadable photo or a failure is the pair's
    Registration status with its reason."""
    features = list(pool.map(_features, [*baselines, *follow_ups]))
    n = len(baselines)
    out = []
    for i in range(n):
        b, f = features[i], features[n + i]
        if isinstance(b, str) or isinstance(f, str):
            out.append(refused(UNREADABLE, f"{'baseline' if isinstance(b, str) else 'follow-up'} photo: "
                                           f"{b if isinstance(b, str) else f}"))
            continue
        try:
            out.append(fit_pair(f, b))
            out[-1].photos = (b, f)
        except Exception as exc:  # a bug must not take the other pairs down
            log(f"progression: registration of pair {i} failed: {exc!r}")
            out.append(refused(UNREADABLE, f"registration failed ({type(exc).__name__})"))
    return out


def answer_pair(index: int, baseline: PhotoResult, follow_up: PhotoResult, registration: Registration,
                log: Callable[[str], None] = _log) -> PairAnswer:
    """One pair's answer from the ensemble's two results (with their PROBABILITY, for the hysteresis) and its
    registration. The answer's results carry no probability (the client is not sent it). Never raises."""
    try:
        report = change_report(Visit.from_png(baseline.report, baseline.mask_png, baseline.probability_png),
                               Visit.from_png(follow_up.report, follow_up.mask_png, follow_up.probability_png),
                               registration, index)
    except Exception as exc:
        log(f"progression: change report of pair {index} failed: {exc!r}")
        report = error_change_report(index, f"change report failed ({type(exc).__name__})")
    return PairAnswer(PhotoResult(baseline.mask_png, baseline.report), PhotoResult(follow_up.mask_png, follow_up.report),
                      report)


def answer_pairs(results: Sequence[PhotoResult], registrations: Sequence[Registration], pool: Executor,
                 log: Callable[[str], None] = _log) -> list[PairAnswer]:
    """The N pairs' answers from the ensemble's 2N results (baselines first) and the N registrations."""
    n = len(registrations)
    for k, result in enumerate(results):  # the ensemble numbers photos 0..2N-1; a pair's report numbers its own
        if "image_index" in result.report:
            result.report["image_index"] = k % n
    return list(pool.map(lambda i: answer_pair(i, results[i], results[n + i], registrations[i], log), range(n)))
