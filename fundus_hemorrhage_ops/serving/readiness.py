"""Withdrawing and restoring /v2/health/ready on a running Triton 2.51, through the repository API.

Triton's strict readiness counts a model whose load failed (state UNAVAILABLE, reason not "unloaded") as not
ready, so a load of a model that cannot load makes /v2/health/ready answer 400 (~4 ms). Unloading that failed
model does NOT bring readiness back (measured: still 400); loading a valid model under the same name and then
unloading it does (its reason becomes "unloaded"): restore_readiness, ~2-3 s (one stub start).
"""

from __future__ import annotations

import logging

from .admin import Admin

log = logging.getLogger(__name__)

# The model that never loads. Used by the drain (readiness 400 from its first moment to the end: before, it
# returned to 200 for 10-250 ms whenever the ensemble or the steps finished unloading, measured with
# tests/test_drain_readiness.py) and by the watchdog while a model cannot serve.
NOT_READY_MODEL = "hemoseg_stopping"

# The valid stand-in loaded (then unloaded) under the same name to restore readiness.
_PLACEHOLDER_PY = b"""
class TritonPythonModel:
    def execute(self, requests):
        return []
"""


def withdraw_readiness(admin: Admin) -> None:
    """Make /v2/health/ready answer 400 until restore_readiness (or the end of the process)."""
    status, _ = admin.load(NOT_READY_MODEL, {"name": NOT_READY_MODEL, "backend": NOT_READY_MODEL},
                           {"1/stopping": b""})
    log.info("readiness withdrawn: /v2/health/ready answers 400 (the load of '%s' failed on purpose, HTTP %s)",
             NOT_READY_MODEL, status)


def restore_readiness(admin: Admin) -> bool:
    """Undo withdraw_readiness: a valid stand-in replaces the failed model, then is unloaded. True if done."""
    config = {"name": NOT_READY_MODEL, "backend": "python", "max_batch_size": 0,
              "input": [{"name": "X", "data_type": "TYPE_INT32", "dims": [1]}],
              "output": [{"name": "Y", "data_type": "TYPE_INT32", "dims": [1]}],
              "instance_group": [{"kind": "KIND_CPU", "count": 1}]}
    status, message = admin.load(NOT_READY_MODEL, config, {"1/model.py": _PLACEHOLDER_PY})
    admin.unload(NOT_READY_MODEL)
    if status == 200:
        log.info("readiness restored")
    else:
        log.info("readiness could not be restored (HTTP %s: %s)", status, message[:300])
    return status == 200
