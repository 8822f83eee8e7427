"""The serving path in one process: photo bytes -> preprocess -> model -> postprocess, as the ensemble runs it.

Used where the ensemble's result is wanted without Triton: training's evaluation, build_engines' int8 gate and
parity checks, the in-process and FastAPI arms of fundus_hemorrhage_perf/bench.py. A `Model` maps PIXELS [N, 3, S, S] float32 to
the unet's outputs by name: PROBABILITY [N, 1, S, S], THRESHOLD [N, 1], MODEL_VERSION [N, 1].

Both run the same per-photo steps (fundus_hemorrhage.steps): decode and preprocess, one optic disc and fovea
detector call on the request's readable, gradable photos, the model on the whole batch, then each photo's mask and
report from the same rows (GEOMETRY, ANATOMY, QUALITY, ERROR) that the ensemble's tensors carry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import contract as c
from .anatomy import AnatomyDetector
from .onnx_session import SERVING_THREADS, create_session, run
from .postprocessing import PostprocessConfig
from .preprocessing import Preprocessed, PreprocessConfig
from .report import PhotoResult
from .steps import answer_photos, read_photo, read_photos

Model = Callable[[np.ndarray], dict[str, np.ndarray]]


def onnx_model(path: str | Path, threads: int = SERVING_THREADS) -> Model:
    """An ONNX graph built by build_engines, on the serving session options."""
    session = create_session(path, threads)
    return lambda pixels: run(session, pixels)


def with_identity(probability: Callable[[np.ndarray], np.ndarray], version: int, threshold: float) -> Model:
    """A `Model` from a function giving only PROBABILITY (e.g. PyTorch), with a fixed version and threshold."""
    def model(pixels: np.ndarray) -> dict[str, np.ndarray]:
        n = pixels.shape[0]
        return {c.PROBABILITY: probability(pixels), c.THRESHOLD: np.full((n, 1), threshold, np.float32),
                c.MODEL_VERSION: np.full((n, 1), version, np.int32)}
    return model


class Pipeline:
    """preprocess -> model -> postprocess for a batch of photos, with the ensemble's per-photo error handling.

    `threads` photos are pre- and postprocessed at a time (the ensemble's Python models use 2 threads each).
    `anatomy`: run the optic disc and fovea detector (one ONNX Runtime thread, as each preprocess instance);
    False leaves the reports' anatomical fields null ("detector not available"), e.g. to measure its cost or
    where only masks matter. Default: run it when the working grid is the contract's, the grid it was trained on.
    """

    def __init__(self, model: Model, preprocess_config: PreprocessConfig = PreprocessConfig(),
                 postprocess_config: PostprocessConfig = PostprocessConfig(), threads: int = 2,
                 anatomy: bool | None = None):
        self.model = model
        self.preprocess_config, self.postprocess_config = preprocess_config, postprocess_config
        self.pool = ThreadPoolExecutor(max(1, threads))
        if anatomy is None:
            anatomy = preprocess_config.working_size == c.WORKING_SIZE
        self.anatomy_detector = AnatomyDetector(threads=1) if anatomy else None

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int = SERVING_THREADS, **kwargs) -> "Pipeline":
        return cls(onnx_model(path, threads), **kwargs)

    def preprocess(self, images: Sequence[bytes]) -> list[Preprocessed | str]:
        """Each photo's model input and geometry, or the reason it cannot be read."""
        return list(self.pool.map(lambda i: read_photo(images[i], self.preprocess_config, i), range(len(images))))

    def predict(self, pre: Sequence[Preprocessed | str]) -> dict[str, np.ndarray]:
        """The model's outputs for a preprocessed batch (unreadable photos get zero pixels, as in the ensemble)."""
        s = self.preprocess_config.working_size
        zeros = np.zeros((3, s, s), np.float32)
        return self.model(np.stack([p.pixels if isinstance(p, Preprocessed) else zeros for p in pre]))

    def __call__(self, images: Sequence[bytes], with_probability: bool = False) -> list[PhotoResult]:
        """One request: a result per photo, in order (`steps`: an error report for an unreadable photo)."""
        batch = read_photos(images, self.preprocess_config, self.pool, self.anatomy_detector)
        out = self.model(batch.pixels)
        return answer_photos(out[c.PROBABILITY], out[c.THRESHOLD], out[c.MODEL_VERSION], batch.geometry,
                             batch.anatomy, batch.errors, batch.quality, self.postprocess_config, with_probability,
                             self.pool)

    def close(self) -> None:
        self.pool.shutdown()
