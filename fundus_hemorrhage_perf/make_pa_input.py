#!/usr/bin/env python3
"""Write a perf_analyzer --input-data JSON file holding real photos for the ensemble's BYTES input IMAGE.

    python fundus_hemorrhage_perf/make_pa_input.py [--photos DIR] [--photo-glob '*.jpg'] [--limit N] [--out fundus_hemorrhage_perf/results/pa_input.json]

One "data" entry per photo (one batch-1 step): {"IMAGE": {"b64": base64(<uint32 little-endian length><file bytes>)}}.
perf_analyzer puts the decoded bytes on the wire as the tensor's raw data, and a BYTES tensor's raw data is each
element's 4-byte length followed by its bytes, so the prefix must be inside the base64. With -b N perf_analyzer
fills a request with N consecutive entries (round-robin), so each request carries N different photos when
there are at least N photos.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from fundus_hemorrhage.contract import IMAGE
from fundus_hemorrhage_perf.common import DEFAULT_GLOB, REPO_ROOT, load_photos


def entry(data: bytes) -> dict:
    raw = len(data).to_bytes(4, "little") + data
    # the same bytes tritonclient puts on the wire for a one-element BYTES tensor
    assert raw == serialize_byte_tensor(np.array([data], dtype=np.object_)).item()
    assert deserialize_bytes_tensor(raw)[0] == data
    return {IMAGE: {"b64": base64.b64encode(raw).decode("ascii")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=None,
                   help="photos folder (default: the repository's samples/; e.g. ../shared/data/idrid_he/images)")
    p.add_argument("--photo-glob", default=DEFAULT_GLOB)
    p.add_argument("--limit", type=int, default=0, help="at most this many photos (0: all)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "fundus_hemorrhage_perf" / "results" / "pa_input.json")
    args = p.parse_args(argv)
    photos = load_photos(args.photos, args.photo_glob)
    if args.limit:
        photos = photos[:args.limit]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": [entry(data) for _, data in photos]}))
    size = sum(len(d) for _, d in photos)
    print(f"{args.out}: {len(photos)} photos ({size / 2**20:.1f} MiB of files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
