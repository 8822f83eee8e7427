"""A/B routing between unet versions (pure logic; the Triton side is model_repository/unet_router/1/model.py).

A traffic split is written "VERSION:WEIGHT,..." (e.g. "3:90,2:10"; weights are relative, need not sum to 100).
Each request goes to one version:

  * the request parameter `unet_version` pins it;
  * else the request parameter `routing_key` (a pseudonymous patient or study id) is hashed to a position in
    [0, 1), which falls into one version's share of the cumulative weights: the same key always lands on the same
    version while the split is unchanged. Shares are laid out newest version first, so moving weight from an
    older to a newer version only moves keys towards the newer one;
  * else a uniform random position does the same (an unbiased draw by the weights);
  * with no split, the newest loaded version serves (Triton's version -1).

Shadow agreement (served vs candidate) is measured on the working grid, each mask at its own version's threshold
(the rule of fundus_hemorrhage.postprocessing: round(255 p) >= ceil(255 threshold)), lesions as 8-connected
components of at least `min_lesion_working_px` pixels, as postprocess counts them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import cv2
import numpy as np

from .contract import MASK_PARAMETER, PROBABILITY_PARAMETER, ROUTING_KEY_PARAMETER, UNET_VERSION_PARAMETER
from .postprocessing import PostprocessConfig, probability_levels, threshold_level

NEWEST = -1  # Triton's "latest loaded version"


class TrafficError(ValueError):
    """A traffic split that cannot be used (bad syntax, a weight < 0, no positive weight, a version named twice)."""


@dataclass(frozen=True)
class Split:
    """Versions with their relative weights, newest first; weight-0 versions are served (pins, shadow) but get no
    unpinned traffic."""
    weights: tuple[tuple[int, float], ...] = ()

    @property
    def versions(self) -> list[int]:
        """Every version named, newest first."""
        return [v for v, _ in self.weights]

    @property
    def active(self) -> list[int]:
        """Versions with a positive weight, newest first."""
        return [v for v, w in self.weights if w > 0]

    def shares(self) -> dict[int, float]:
        """Version -> share of unpinned traffic in [0, 1]."""
        total = sum(w for _, w in self.weights)
        return {v: w / total for v, w in self.weights} if total else {}

    def pick(self, position: float) -> int:
        """The version whose share of [0, 1) holds `position`; NEWEST when the split is empty."""
        total = sum(w for _, w in self.weights)
        if not total:
            return NEWEST
        bound = 0.0
        for version, weight in self.weights:
            bound += weight / total
            if weight > 0 and position < bound:
                return version
        return self.active[-1]  # position within rounding of 1.0

    def __str__(self) -> str:
        return format_traffic(self)


def parse_traffic(text: str) -> Split:
    """"3:90,2:10" -> Split(((3, 90.0), (2, 10.0))), sorted newest first. "" (or only spaces) -> the empty split.
    Raises TrafficError naming the bad part."""
    text = (text or "").strip()
    if not text:
        return Split()
    weights: dict[int, float] = {}
    for part in text.split(","):
        version, sep, weight = part.strip().partition(":")
        try:
            v, w = int(version), float(weight)
        except ValueError:
            raise TrafficError(f"traffic {text!r}: {part.strip()!r} is not VERSION:WEIGHT") from None
        if not sep or v < 1:
            raise TrafficError(f"traffic {text!r}: {part.strip()!r} is not VERSION:WEIGHT with VERSION >= 1")
        if not (w >= 0 and w != float("inf")):
            raise TrafficError(f"traffic {text!r}: version {v} has weight {weight!r}; weights are finite and >= 0")
        if v in weights:
            raise TrafficError(f"traffic {text!r}: version {v} is named twice")
        weights[v] = w
    if not any(w > 0 for w in weights.values()):
        raise TrafficError(f"traffic {text!r}: no version has a positive weight")
    return Split(tuple(sorted(weights.items(), reverse=True)))


def format_traffic(split: Split) -> str:
    return ",".join(f"{v}:{w:g}" for v, w in split.weights)


def key_position(routing_key: str) -> float:
    """A routing key's fixed position in [0, 1): the first 8 bytes of its BLAKE2b digest / 2**64 (stable across
    processes and Python versions, unlike hash())."""
    digest = hashlib.blake2b(routing_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def choose(split: Split, routing_key: str | None = None, rng: random.Random | None = None) -> int:
    """The version for one unpinned request: by `routing_key` (sticky) or a random draw; NEWEST without a split."""
    position = key_position(routing_key) if routing_key else (rng or random).random()
    return split.pick(position)


def parse_version(value) -> int:
    """A `unet_version` request parameter (int or string) -> version >= 1; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"unet_version {value!r} is not a version number")
    version = int(value)  # ValueError for "abc"; int("3") and 3 both fine
    if version < 1:
        raise ValueError(f"unet_version {value!r} is not a version number (>= 1)")
    return version


def working_mask(probability: np.ndarray, threshold: float) -> np.ndarray:
    """[1, S, S] or [S, S] probabilities -> bool [S, S] mask at `threshold` (postprocess's rule)."""
    return probability_levels(probability) >= threshold_level(threshold)


def lesion_count(mask: np.ndarray, min_lesion_working_px: float = PostprocessConfig.min_lesion_working_px) -> int:
    """8-connected components of a bool mask with at least `min_lesion_working_px` pixels."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return int(np.count_nonzero(stats[1:, cv2.CC_STAT_AREA] >= min_lesion_working_px)) if n > 1 else 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty (they agree)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def agreement(served: np.ndarray, served_threshold: float, shadow: np.ndarray, shadow_threshold: float,
              min_lesion_working_px: float = PostprocessConfig.min_lesion_working_px) -> tuple[float, int]:
    """(mask Dice, shadow lesion count - served lesion count) for one photo's working-grid probabilities."""
    a, b = working_mask(served, served_threshold), working_mask(shadow, shadow_threshold)
    return dice(a, b), lesion_count(b, min_lesion_working_px) - lesion_count(a, min_lesion_working_px)


# ------------------------------------------------------------------------------------- request parameters

REQUEST_PARAMETERS = (PROBABILITY_PARAMETER, MASK_PARAMETER, ROUTING_KEY_PARAMETER, UNET_VERSION_PARAMETER)  # all
MAX_ROUTING_KEY_CHARS = 256
_BOOLEAN_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ParameterError(ValueError):
    """A request parameter that cannot be used: `name` and the reason (the client's INVALID_ARGUMENT)."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"request parameter {name!r}: {reason}")


def _shown(value, limit: int = 60) -> str:
    text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (surrogateescape), or a "\udcff" escape
        return False
    return True


def request_parameters(raw: str | bytes | None) -> dict:
    """A request's parameters as the Python backend gives them (a JSON object; bytes when they are not UTF-8, e.g.
    UnicodeDecodeError.object), checked: `probability` and `mask` true/false, `unet_version` a version number >= 1 (int),
    `routing_key` text of at most MAX_ROUTING_KEY_CHARS characters (an int is taken as its digits), nothing else.
    Returns {name: value} with `probability` and `mask` bools, `unet_version` an int, `routing_key` a str. Raises
    ParameterError naming the first bad parameter and why."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8", "surrogateescape")
    try:
        params = json.loads(raw or "{}")
    except ValueError:
        raise ParameterError("?", "the request's parameters are not readable (not a JSON object)") from None
    if not isinstance(params, dict):
        raise ParameterError("?", "the request's parameters are not a JSON object")
    out = {}
    for name, value in params.items():
        if not _is_utf8(name):
            raise ParameterError(name.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace"),
                                 "the parameter's name is not UTF-8 text")
        if isinstance(value, str) and not _is_utf8(value):
            raise ParameterError(name, "the value is not UTF-8 text (bytes that are not characters)")
        if name in (PROBABILITY_PARAMETER, MASK_PARAMETER):
            if isinstance(value, bool):
                out[name] = value
            elif isinstance(value, int) and value in (0, 1):
                out[name] = bool(value)
            elif isinstance(value, str) and value.strip().lower() in _BOOLEAN_TEXT:
                out[name] = _BOOLEAN_TEXT[value.strip().lower()]
            else:
                raise ParameterError(name, f"{_shown(value)} is not true or false")
        elif name == UNET_VERSION_PARAMETER:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ParameterError(name, f"{_shown(value)} is not a version number")
            try:
                out[name] = parse_version(value.strip() if isinstance(value, str) else value)
            except ValueError:
                raise ParameterError(name, f"{_shown(value)} is not a version number (an integer >= 1)") from None
        elif name == ROUTING_KEY_PARAMETER:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ParameterError(name, f"{_shown(value)} is not text (a pseudonymous patient or study id)")
            key = str(value)
            if len(key) > MAX_ROUTING_KEY_CHARS:
                raise ParameterError(name, f"{len(key)} characters, over the limit of {MAX_ROUTING_KEY_CHARS}")
            out[name] = key
        else:
            raise ParameterError(name, f"unknown parameter; accepted: {', '.join(REQUEST_PARAMETERS)}")
    return out
