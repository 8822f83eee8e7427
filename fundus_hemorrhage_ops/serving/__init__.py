"""What serve.py runs around tritonserver.

    launcher    find tritonserver, its command line and environment, wait until ready, pin a version, run it
                generation by generation (restart after a crash, recycle when the watchdog asks)
    proxy       the port guard: HAProxy in front of Triton's HTTP and gRPC ports (compressed requests and
                oversized HTTP bodies refused; gRPC TLS terminated there)
    process     tritonserver as a child: own session, PDEATHSIG, subreaper and reaping of orphaned stubs
    readiness   withdraw and restore /v2/health/ready through the repository API
    admin       Triton's HTTP admin API (repository index, configs, load, unload) with the admin key
    supervisor  the thread that runs the watchdog and the update poller
    watchdog    Python backend stubs via /proc, per instance generation: restart a model whose stub died
                (readiness withdrawn meanwhile), ask for a recycle when Triton keeps a dead generation
    updates     the repository-update planner (pure) and the poller that applies its plans
    validation  the checks a new version folder passes before it is loaded
    drain       SIGTERM/SIGINT: refuse new requests, finish those in flight, unload, stop
"""
