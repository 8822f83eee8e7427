"""Performance measurement tools (locust load, bench.py side-by-side harness, perf_analyzer helpers)."""
