"""Client of the `hemorrhage_progression` model: pairs of photos of one eye (baseline, follow-up) -> both visits'
answers and the change report, over gRPC or HTTP (segment.py --compare is its command line).

    client = client.make_client("127.0.0.1:8001", "grpc")
    for pair in compare(client, "grpc", [(baseline_bytes, follow_up_bytes)]):
        pair.change_report["summary"], pair.baseline.mask_png, pair.follow_up.report

`compare` sends the pairs as one request (BASELINE and FOLLOW_UP BYTES [N, 1], N <= contract.MAX_PAIRS).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from . import contract as c
from .client import client_module, error_text
from .progression import error_change_report
from .report import PhotoResult, error_report
from .visits import PairAnswer

OUTPUTS = (c.BASELINE_MASK, c.FOLLOW_UP_MASK, c.BASELINE_LESIONS, c.FOLLOW_UP_LESIONS, c.CHANGE_REPORT)


def pair_inputs(protocol: str, pairs: Sequence[tuple[bytes, bytes]]) -> list:
    """BASELINE and FOLLOW_UP inputs, BYTES [N, 1]."""
    module = client_module(protocol)
    out = []
    for name, k in ((c.BASELINE, 0), (c.FOLLOW_UP, 1)):
        data = np.empty((len(pairs), 1), dtype=np.object_)
        data[:, 0] = [p[k] for p in pairs]
        tensor = module.InferInput(name, [len(pairs), 1], "BYTES")
        tensor.set_data_from_numpy(data)
        out.append(tensor)
    return out


def infer_pairs(client, protocol: str, pairs: Sequence[tuple[bytes, bytes]], timeout: float | None = None):
    """One progression request; tritonclient's InferResult. Raises InferenceServerException when refused."""
    module = client_module(protocol)
    kwargs = {"client_timeout": timeout} if protocol == "grpc" and timeout else {}
    return client.infer(c.PROGRESSION, pair_inputs(protocol, pairs),
                        outputs=[module.InferRequestedOutput(n) for n in OUTPUTS], **kwargs)


def _json(raw, fallback: dict) -> dict:
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return fallback


def compare(client, protocol: str, pairs: Sequence[tuple[bytes, bytes]], timeout: float | None = None
            ) -> list[PairAnswer]:
    """A PairAnswer per pair, in order; never raises: a request that fails as a whole gives every pair the
    change report status "error" with the reason."""
    if not pairs:
        return []
    try:
        result = infer_pairs(client, protocol, pairs, timeout)
        columns = [result.as_numpy(n).reshape(-1) for n in OUTPUTS]
    except Exception as exc:
        reason = f"request failed: {error_text(exc)}"
        return [PairAnswer(PhotoResult(b"", error_report(i, reason)), PhotoResult(b"", error_report(i, reason)),
                           error_change_report(i, reason)) for i in range(len(pairs))]
    out = []
    for i, (b_mask, f_mask, b_report, f_report, change) in enumerate(zip(*columns)):
        bad = error_report(i, "malformed lesion report from the server")
        out.append(PairAnswer(PhotoResult(bytes(b_mask), _json(b_report, bad)),
                              PhotoResult(bytes(f_mask), _json(f_report, bad)),
                              _json(change, error_change_report(i, "malformed change report from the server"))))
    return out
