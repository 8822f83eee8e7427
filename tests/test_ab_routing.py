"""A/B routing logic (fundus_hemorrhage.routing), without a server. The traffic CLI and the live state it edits
(no repository edits any more): tests/test_live_state.py."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.model_config import parameters, read_config, router_config, unet_config
from fundus_hemorrhage.routing import (NEWEST, Split, TrafficError, agreement, choose, dice, format_traffic,
                                       key_position, lesion_count, parse_traffic, parse_version, working_mask)

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def test_parse_traffic_sorts_newest_first_and_round_trips():
    split = parse_traffic(" 2:10, 3:90 ")
    assert split.weights == ((3, 90.0), (2, 10.0))
    assert split.versions == [3, 2] and split.active == [3, 2]
    assert split.shares() == {3: 0.9, 2: 0.1}
    assert format_traffic(split) == "3:90,2:10" and parse_traffic(str(split)) == split
    assert parse_traffic("") == Split() and parse_traffic("  ") == Split()
    assert parse_traffic("3:0,2:1").active == [2]


@pytest.mark.parametrize("text, words", [("3", "VERSION:WEIGHT"), ("x:1", "VERSION:WEIGHT"), ("0:5", ">= 1"),
                                         ("3:-1", ">= 0"), ("3:inf", "finite"), ("3:nan", "finite"),
                                         ("3:1,3:2", "named twice"), ("3:0,2:0", "no version has a positive")])
def test_parse_traffic_refuses_bad_splits(text, words):
    with pytest.raises(TrafficError, match=words):
        parse_traffic(text)


def test_no_split_serves_the_newest_version():
    assert choose(Split()) == NEWEST and choose(Split(), "patient-1") == NEWEST


def test_random_draw_follows_the_weights():
    rng = random.Random(7)
    counts = Counter(choose(parse_traffic("3:70,2:30"), None, rng) for _ in range(20000))
    assert abs(counts[3] / 20000 - 0.7) < 0.015  # binomial sd 0.0032
    assert set(counts) == {2, 3}
    assert Counter(choose(parse_traffic("3:0,2:100"), None, rng) for _ in range(1000)) == {2: 1000}


# The documented rule (routing.key_position): the first 8 bytes of the key's UTF-8 BLAKE2b digest, big-endian,
# / 2**64. These digests were written down once (hashlib.blake2b(key.encode(), digest_size=8).hexdigest()), so a
# change of the rule, or a salted hash() that differs between processes, fails here.
KEY_DIGESTS = {"patient-1": "72d1dbb28079ee3c", "study/42": "69c962000084c58e", "ä": "f04dbbe25e2ba039"}


@pytest.mark.parametrize("key, digest", sorted(KEY_DIGESTS.items()))
def test_routing_key_position_is_the_documented_blake2b_rule(key, digest):
    assert key_position(key) == int(digest, 16) / 2.0**64
    assert 0.0 <= key_position(key) < 1.0


def test_routing_key_is_sticky_and_spread():
    split = parse_traffic("3:70,2:30")
    # patient-1 at 0.449 and study/42 at 0.413 fall in version 3's share [0, 0.7); ä at 0.939 in version 2's
    for key, version in (("patient-1", 3), ("study/42", 3), ("ä", 2)):
        assert {choose(split, key, random.Random(i)) for i in range(20)} == {version}  # the rng is not used
    keys = [f"patient-{i}" for i in range(5000)]
    positions = np.array([key_position(k) for k in keys])
    assert ((positions >= 0) & (positions < 1)).all() and len(set(positions.tolist())) == len(keys)
    deciles = np.bincount((positions * 10).astype(int), minlength=10) / len(keys)
    assert np.abs(deciles - 0.1).max() < 0.02  # spread evenly over [0, 1): binomial sd 0.0042
    # newest version first: a key goes to version 3 exactly when its position is below 3's share
    assert all(choose(split, k) == (3 if p < 0.7 else 2) for k, p in zip(keys, positions))
    counts = Counter(choose(split, k) for k in keys)
    assert abs(counts[3] / 5000 - 0.7) < 0.03


def test_moving_weight_to_the_newer_version_only_moves_keys_towards_it():
    before, after = parse_traffic("3:10,2:90"), parse_traffic("3:50,2:50")
    moved = [(choose(before, f"k{i}"), choose(after, f"k{i}")) for i in range(3000)]
    assert all(a == b or (a, b) == (2, 3) for a, b in moved)
    assert sum(a != b for a, b in moved) > 0


def test_parse_version():
    assert parse_version(3) == 3 and parse_version("12") == 12
    for bad in ("abc", 0, -2, True, "1.5"):
        with pytest.raises(ValueError):
            parse_version(bad)


def test_shadow_agreement_uses_each_versions_threshold():
    p = np.zeros((1, 8, 8), np.float32)
    p[0, 1:3, 1:3] = 0.3  # above 0.2, below 0.5
    p[0, 5:7, 5:7] = 0.9
    assert working_mask(p, 0.2).sum() == 8 and working_mask(p, 0.5).sum() == 4
    assert lesion_count(working_mask(p, 0.2)) == 2 and lesion_count(working_mask(p, 0.2), 5) == 0
    d, diff = agreement(p, 0.2, p, 0.5)
    assert d == pytest.approx(2 * 4 / 12) and diff == -1
    assert agreement(p, 0.2, p, 0.2) == (1.0, 0)
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_router_config_has_the_unet_interface():
    router, unet = router_config(), unet_config()
    assert list(router.input) == list(unet.input) and list(router.output) == list(unet.output)
    assert router.max_batch_size == unet.max_batch_size
    committed = read_config(REPOSITORY / c.ROUTER)
    assert parameters(committed)["traffic"] == ""  # the repository ships without a split: newest version

