#!/usr/bin/env python3
"""Start NVIDIA Triton Inference Server on the model repository, in the foreground, and look after it.

    python serve.py [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
                    [--model-repository ./model_repository] [--poll-interval 5] [--watchdog-interval 2]
                    [--max-request-bytes N] [--max-in-flight 8] [--no-http-proxy] [--no-grpc-proxy]
                    [--grpc-tls-cert CERT --grpc-tls-key KEY [--grpc-tls-root-cert CA]]
                    [--traffic "3:90,2:10"]   (A/B split between unet versions: README, A/B testing)

Finds `tritonserver` on PATH (the NGC image) or inside the nvidia-pytriton wheel, prepares the Python
backend with the stub for the running Python, waits until the server is ready and prints its URLs
(fundus_hemorrhage_ops/serving/launcher.py).
SIGTERM or SIGINT: new requests are answered UNAVAILABLE (retry elsewhere), the ones in flight finish, every
model is unloaded, Triton stops, and this exits 0 (fundus_hemorrhage_ops/serving/drain.py).

Model loading is explicit (all models at start-up). The model-repository (load/unload), shared-memory, trace
and logging APIs answer only requests that carry the header `admin-key: $HEMOSEG_ADMIN_KEY`; without that
variable a random key is generated and never shown, i.e. the APIs are closed to clients (serve.py itself uses it).

While Triton runs, a supervisor thread
  * restarts a model whose Python stub process died (watchdog, every --watchdog-interval s): Triton 2.51 itself
    keeps answering "Stub process ... is not healthy" for that instance until the model is reloaded;
  * picks up model updates (every --poll-interval s): a new or changed version folder or config.pbtxt is loaded
    through the repository API, after checking the new version folder (its files are there, its ONNX model loads
    and gives the configured shapes, the identity baked into it names the folder's version number); a version
    that fails the check, or that Triton refuses, is not served and the version served before keeps serving
    (fundus_hemorrhage_ops/serving/watchdog.py, updates.py, validation.py).

HTTP and gRPC go through HAProxy on --http-port and --grpc-port (Triton's endpoints listen on loopback ports
behind it; fundus_hemorrhage_ops/serving/proxy.py). HTTP: a compressed body (Content-Encoding other than identity)
gets 415, a body over --max-request-bytes + 1 MiB 413, a chunked body 411. gRPC: a compressed message
(grpc-encoding other than identity) gets INVALID_ARGUMENT; an HTTP inference request over --max-in-flight (plus
2x that many queued for up to 30 s) gets 503 "server busy"; with --grpc-tls-cert HAProxy terminates the TLS
(and checks client certificates with --grpc-tls-root-cert). Everything else passes through. --no-http-proxy /
--no-grpc-proxy: only behind a reverse proxy of your own that does the same. tritonserver and HAProxy run in
their own session (a terminal's Ctrl-C reaches serve.py only, which drains) and die with serve.py. If tritonserver dies, or holds
a stub generation it will never release, serve.py starts it again (back-off 1-30 s; readiness down meanwhile).

Requests carry image bytes only (no file paths). --max-request-bytes bounds the image bytes of one request
(checked by the preprocess model; Triton 2.51 has no request-size option of its own). --grpc-tls-cert/-key
serve gRPC over TLS (--grpc-tls-root-cert: mutual TLS). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fundus_hemorrhage.routing import TrafficError, parse_traffic
from fundus_hemorrhage_ops.serving.launcher import serve
from fundus_hemorrhage_ops.serving.traffic import check_split

REPO_ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    p.add_argument("--exit-timeout", type=int, default=60, help="seconds to let in-flight requests finish")
    p.add_argument("--poll-interval", type=float, default=5.0,
                   help="seconds between model-repository scans for updates; 0 disables (default 5)")
    p.add_argument("--watchdog-interval", type=float, default=2.0,
                   help="seconds between checks of the Python stub processes; 0 disables (default 2)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="most image bytes in one request (default: the ensemble's max_batch_size x the preprocess "
                        "max_bytes, 16 x 64 MiB)")
    p.add_argument("--max-in-flight", type=int, default=8,
                   help="HTTP inference requests HAProxy lets through to Triton at once; up to 2x more wait in "
                        "HAProxy (30 s at most), the rest get 503 server busy (gRPC is not bounded); "
                        "0: no bound (docs/reliability.md, section 8; default 8)")
    p.add_argument("--grpc-tls-cert", type=Path, help="PEM server certificate: gRPC over TLS (with --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", type=Path, help="PEM private key of --grpc-tls-cert")
    p.add_argument("--grpc-tls-root-cert", type=Path,
                   help="PEM CA certificate: mutual TLS, clients must present a certificate it signed")
    p.add_argument("--unet-version", type=int, default=None,
                   help="serve this version of the U-Net (default: the newest, as unet/config.pbtxt says)")
    p.add_argument("--traffic", metavar="SPLIT",
                   help='A/B split between unet versions, e.g. "3:90,2:10" (version:weight), served from the start; '
                        "live state of this run (.triton/runs/<pid>/), never written into the repository: the "
                        "next start without --traffic serves the committed configs. Change it while serving with "
                        "python -m fundus_hemorrhage_ops.serving.traffic (README: A/B testing)")
    p.add_argument("--no-http-proxy", action="store_true",
                   help="serve Triton's HTTP endpoint on --http-port directly, without the HAProxy guard (only behind a "
                        "reverse proxy of your own that refuses compressed and oversized bodies; docs/reliability.md)")
    p.add_argument("--no-grpc-proxy", action="store_true",
                   help="serve Triton's gRPC endpoint on --grpc-port directly, without the HAProxy guard (only behind a "
                        "gRPC proxy of your own that refuses compressed messages; docs/reliability.md)")
    p.add_argument("--log-verbose", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key):
        p.error("--grpc-tls-cert and --grpc-tls-key go together")
    if args.grpc_tls_root_cert and not args.grpc_tls_cert:
        p.error("--grpc-tls-root-cert needs --grpc-tls-cert and --grpc-tls-key")
    for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_root_cert"):
        path = getattr(args, name)
        if path is not None:
            if not os.access(path, os.R_OK):
                p.error(f"--{name.replace('_', '-')}: cannot read {path}")
            setattr(args, name, path.resolve())
    if args.traffic is not None:
        if args.unet_version is not None:
            p.error("--traffic and --unet-version exclude each other (pin a version with --traffic N:1)")
        try:
            args.traffic = parse_traffic(args.traffic)
        except TrafficError as exc:
            p.error(f"--traffic: {exc}")
    if args.max_in_flight < 0:
        p.error("--max-in-flight must be 0 (no bound) or positive")
    if args.max_request_bytes is not None and args.max_request_bytes <= 0:
        p.error("--max-request-bytes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.traffic is not None:
        try:
            check_split(args.model_repository, args.traffic)
        except TrafficError as exc:
            sys.exit(f"serve.py: --traffic: {exc}")
    return serve(args, work_dir=REPO_ROOT / ".triton")


if __name__ == "__main__":
    sys.exit(main())
