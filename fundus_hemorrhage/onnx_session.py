"""The one ONNX Runtime session factory: the unet adapter, training's evaluation, build_engines' int8 gate, the
benchmarks and the FastAPI baseline all run the model with these options, so what they measure is what is served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract as c

SERVING_THREADS = 2  # intra-op threads of the served unet (model_config.unet_config's intra_op_threads)


def create_session(path: str | Path, threads: int = SERVING_THREADS) -> ort.InferenceSession:
    """A CPU session as Triton's unet serves it: `threads` intra-op threads (0: one per core), one inter-op thread
    (the graph is a chain), every graph optimisation. Raises onnxruntime's errors for an unloadable file."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """PIXELS float32 [N, 3, S, S] -> every output of the graph by name (PROBABILITY [N, 1, S, S], THRESHOLD and
    MODEL_VERSION [N, 1] for a graph built by build_engines)."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {c.PIXELS: np.ascontiguousarray(pixels, dtype=np.float32)})))
