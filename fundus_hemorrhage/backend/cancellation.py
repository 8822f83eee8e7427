"""Requests the client has given up on (gRPC deadline or cancel), answered without doing their work.

Triton 2.51 (request cancellation, r23.10+): the gRPC frontend marks a request cancelled when its client cancels it
or its deadline (tritonclient `client_timeout`) passes, and the core refuses a cancelled request at a dynamic
batcher (here: unet_router, unet) and between ensemble steps. A Python-backend step that is already executing, or
that has no dynamic batcher (preprocess, postprocess), is not stopped: it has to ask, with `request.is_cancelled()`.
Measured on the real service (docs/reliability.md, section 8): a 10-photo request cancelled while the router ran
went through postprocess in full before this check. HTTP has no cancellation in 2.51: a client that closes its
connection is not seen until the answer is written.

Must be called inside a Triton Python model (imports triton_python_backend_utils lazily).
"""

from __future__ import annotations


def cancelled_response(request, step: str, photos: int, log=None):
    """An InferenceResponse with error CANCELLED for a request its client has cancelled, else None. `step`
    (e.g. "postprocess") and `photos` (the request's batch size) go into the error and the log line (`log`: a
    function of one string, e.g. pb_utils.Logger.log_info)."""
    if not request.is_cancelled():
        return None
    import triton_python_backend_utils as pb_utils

    message = f"{step}: request cancelled by the client (deadline passed or call cancelled); {photos} photo(s) skipped"
    if log is not None:
        log(message)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.CANCELLED))
