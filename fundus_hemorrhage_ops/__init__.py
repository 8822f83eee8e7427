"""Operations: what runs the service and builds its engines, above the runtime (fundus_hemorrhage) and training.

    serving       what serve.py runs around tritonserver: launcher, port guard, admin API, watchdog, updates,
                  traffic, drain
    engines       what build_engines.py runs: export, parity, int8, TensorRT, version folders, the identity
    local_server  serve.py on free loopback ports for the tests and the benchmarks
"""
