"""What serve.py runs around tritonserver.

    launcher    find tritonserver, its command line and environment, wait until ready, pin a version, run
    admin       Triton's HTTP admin API (repository index, configs, load, unload) with the admin key
    supervisor  the thread that runs the watchdog and the update poller
    watchdog    Python backend stubs via /proc: restart a model whose stub died, remove its shared memory
    updates     the repository-update planner (pure) and the poller that applies its plans
    validation  the checks a new version folder passes before it is loaded
    drain       SIGTERM/SIGINT: refuse new requests, finish those in flight, unload, stop
"""
