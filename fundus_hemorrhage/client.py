"""Client library of the haemorrhage segmentation service (the Triton ensemble), over gRPC or HTTP.

    client = make_client("127.0.0.1:8001", "grpc")
    check_server(client, "grpc", "127.0.0.1:8001")          # ServerNotReady with a one-line reason otherwise
    for result in segment(client, "grpc", [photo_bytes, ...]):
        result.ok, result.mask_png, result.report, result.error

`segment` sends the photos as one request (IMAGE BYTES [N, 1], N <= contract.MAX_BATCH_SIZE). The ensemble
answers per photo, an error report (status "error", `error` the reason) for each photo it cannot read, however
many they are; `PhotoResult` (fundus_hemorrhage.report) reads the status and reason from the report. `infer` is the bare
request (tritonclient's InferResult), for tools and tests that look at the tensors themselves.
segment.py is this library's command line. tritonclient is imported on first use.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence

import numpy as np

from . import contract as c
from .report import PhotoResult, error_report

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}  # tritonserver's defaults
ALL_OUTPUTS = (c.MASK, c.LESIONS, c.PROBABILITY)


class ServerNotReady(Exception):
    """The server cannot be reached, is not live, or the ensemble is not ready; the message is one line."""


def normalise_url(url: str | None, protocol: str) -> str:
    """host:port for tritonclient: the protocol's default port on the loopback when None; a scheme is dropped."""
    if not url:
        return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
    return re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", url).rstrip("/")


def client_module(protocol: str):
    """tritonclient.grpc or tritonclient.http."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
    return module


def make_client(url: str, protocol: str = "grpc", timeout: float = 300.0):
    """A tritonclient InferenceServerClient for host:port (not to be shared between threads). `timeout`: seconds
    an HTTP request may take (gRPC takes it per call: see `infer`)."""
    module = client_module(protocol)
    if protocol == "grpc":
        return module.InferenceServerClient(url=url)
    return module.InferenceServerClient(url=url, connection_timeout=min(timeout, 10.0), network_timeout=timeout)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    """The server's reason for a failed call, without transport prefixes; one line."""
    message = exc.message() if callable(getattr(exc, "message", None)) else None
    text = re.sub(r"^in ensemble '[^']*', ", "", one_line(message or str(exc) or type(exc).__name__))
    if "failed to connect to all addresses" in text or "Connection refused" in text:
        return "connection refused"
    return text


def check_server(client, protocol: str, url: str, timeout: float = 10.0) -> None:
    """Returns when the server is live and the ensemble ready; ServerNotReady with a one-line reason otherwise."""
    kwargs = {"client_timeout": timeout} if protocol == "grpc" else {}
    try:
        live = client.is_server_live(**kwargs)
    except Exception as exc:  # connection refused, DNS, TLS, timeout: all mean "not reachable"
        raise ServerNotReady(f"cannot reach Triton at {url} over {protocol}: {error_text(exc)}") from None
    if not live:
        raise ServerNotReady(f"Triton at {url} ({protocol}) is not live")
    try:
        ready = client.is_model_ready(c.ENSEMBLE, **kwargs)
    except Exception as exc:
        raise ServerNotReady(f"cannot ask Triton at {url} about model {c.ENSEMBLE!r}: {error_text(exc)}") from None
    if not ready:
        raise ServerNotReady(f"Triton at {url} ({protocol}) is up but model {c.ENSEMBLE!r} is not ready")


def image_input(protocol: str, images: Sequence[bytes]):
    """The ensemble's IMAGE input, BYTES [N, 1], holding the photo files' bytes."""
    module = client_module(protocol)
    data = np.empty((len(images), 1), dtype=np.object_)
    data[:, 0] = list(images)
    image = module.InferInput(c.IMAGE, [len(images), 1], "BYTES")
    image.set_data_from_numpy(data)
    return image


def routing_parameters(routing_key: str | None = None, unet_version: int | None = None) -> dict:
    """Request parameters of the A/B router: a sticky `routing_key` (pseudonymous patient or study id) and/or a
    pinned `unet_version` (README, "A/B testing between unet versions")."""
    out: dict = {}
    if routing_key:
        out[c.ROUTING_KEY_PARAMETER] = str(routing_key)
    if unet_version is not None:
        out[c.UNET_VERSION_PARAMETER] = int(unet_version)
    return out


def infer(client, protocol: str, images, probability: bool | None = None, outputs: Sequence[str] = ALL_OUTPUTS,
          timeout: float | None = None, parameters: dict | None = None):
    """One ensemble request; tritonclient's InferResult. `images`: the photos' bytes, or an input made by
    `image_input` (to send the same photos again without copying them). `probability` sets the request
    parameter contract.PROBABILITY_PARAMETER when not None, and `outputs` without MASK sets MASK_PARAMETER false;
    `parameters` adds others (e.g. `routing_parameters`).
    `timeout`: seconds, gRPC only. Raises tritonclient's InferenceServerException when the server refuses the
    request."""
    module = client_module(protocol)
    image = image_input(protocol, images) if isinstance(images, (list, tuple)) else images
    kwargs = {}
    parameters = dict(parameters or {})
    if probability is not None:
        parameters[c.PROBABILITY_PARAMETER] = probability
    if c.MASK not in outputs:  # no full-size mask encoded for nothing (an ensemble step computes all its outputs)
        parameters[c.MASK_PARAMETER] = False
    if parameters:
        kwargs["parameters"] = parameters
    if protocol == "grpc" and timeout:
        kwargs["client_timeout"] = timeout
    return client.infer(c.ENSEMBLE, [image], outputs=[module.InferRequestedOutput(n) for n in outputs], **kwargs)


def segment_batch(client, protocol: str, images: Sequence[bytes], probability: bool = False,
                  timeout: float | None = None, parameters: dict | None = None) -> list[PhotoResult]:
    """One request, a result per photo in order (`PhotoResult.ok`, `.error`: the photo's status and reason, as
    data in its report). Raises when the request as a whole fails (refused, unreachable, malformed reply)."""
    names = [c.MASK, c.LESIONS] + ([c.PROBABILITY] if probability else [])
    result = infer(client, protocol, list(images), True if probability else None, names, timeout, parameters)
    masks = result.as_numpy(c.MASK).reshape(-1)
    reports = result.as_numpy(c.LESIONS).reshape(-1)
    probs = result.as_numpy(c.PROBABILITY).reshape(-1) if probability else [b""] * len(images)
    if not (len(masks) == len(reports) == len(probs) == len(images)):
        raise RuntimeError(f"malformed reply: {len(masks)} masks, {len(reports)} reports for {len(images)} photos")
    out = []
    for i, (mask, raw, prob) in enumerate(zip(masks, reports, probs)):
        try:
            report = json.loads(raw)
        except (TypeError, ValueError):
            report = error_report(i, "malformed lesion report from the server")
        out.append(PhotoResult(bytes(mask), report, bytes(prob)))
    return out


def segment(client, protocol: str, images: Sequence[bytes], probability: bool = False,
            timeout: float | None = None, parameters: dict | None = None) -> list[PhotoResult]:
    """A result per photo, in order, from one request however many photos fail; never raises. A request that
    fails as a whole (over the request byte limit, a refused parameter, the server gone) gives every photo the
    error "request failed: <reason>"."""
    if not images:
        return []
    start = time.monotonic()
    try:
        results = segment_batch(client, protocol, images, probability, timeout, parameters)
    except Exception as exc:
        reason = f"request failed: {error_text(exc)}"
        results = [PhotoResult(b"", error_report(i, reason)) for i in range(len(images))]
    share = (time.monotonic() - start) / len(images)
    for result in results:
        result.seconds = share
    return results
