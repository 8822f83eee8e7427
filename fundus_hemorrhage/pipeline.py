"""The serving path in one process: photo bytes -> preprocess -> model -> postprocess, as the ensemble runs it.

Used where the ensemble's result is wanted without Triton: training's evaluation, build_engines' int8 gate and
parity checks, the in-process and FastAPI arms of fundus_hemorrhage_perf/bench.py. A `Model` maps PIXELS [N, 3, S, S] float32 to
the unet's outputs by name: PROBABILITY [N, 1, S, S], THRESHOLD [N, 1], MODEL_VERSION [N, 1].

The optic disc and fovea detector runs as in the ensemble's preprocess step: one call on the stacked PIXELS of
the request's readable, gradable photos (`anatomy.anatomy_rows`), its float32 ANATOMY rows handed to postprocess.
The image-quality verdict (`Preprocessed.quality`, the ensemble's QUALITY tensor) goes to postprocess as it is: an
ungradable photo gets an empty mask and a report with status "ungradable" (PhotoResult.ok: answered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import contract as c
from .anatomy import AnatomyDetector, anatomy_rows
from .anatomy_tensor import Anatomy
from .onnx_session import SERVING_THREADS, create_session, run
from .postprocessing import PostprocessConfig, postprocess
from .preprocessing import ImageError, Preprocessed, PreprocessConfig, preprocess
from .report import error_report

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


@dataclass
class PhotoResult:
    """One photo's MASK, LESIONS (parsed) and PROBABILITY (b"" unless asked) as the ensemble returns them."""
    mask_png: bytes
    report: dict
    probability_png: bytes = b""

    @property
    def ok(self) -> bool:
        """Answered: segmented ("ok") or reported ungradable; False for an unreadable photo ("error")."""
        return self.report.get("status") in ("ok", "ungradable")

    @property
    def gradable(self) -> bool:
        return self.report.get("status") == "ok"


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

    def _preprocess_one(self, index: int, data: bytes) -> Preprocessed | str:
        try:
            return preprocess(data, self.preprocess_config)
        except ImageError as exc:
            return f"image {index}: {exc}"

    def preprocess(self, images: Sequence[bytes]) -> list[Preprocessed | str]:
        """Each photo's model input and geometry, or the reason it cannot be read ("image i: ...")."""
        return list(self.pool.map(self._preprocess_one, range(len(images)), images))

    def predict(self, pre: Sequence[Preprocessed | str]) -> dict[str, np.ndarray]:
        """The model's outputs for a preprocessed batch (unreadable photos get zero pixels, as in the ensemble)."""
        s = self.preprocess_config.working_size
        zeros = np.zeros((3, s, s), np.float32)
        return self.model(np.stack([p.pixels if isinstance(p, Preprocessed) else zeros for p in pre]))

    def detect_anatomy(self, pre: Sequence[Preprocessed | str]) -> np.ndarray:
        """The ANATOMY tensor float32 [N, ANATOMY_LENGTH] of a preprocessed batch, as the ensemble computes it
        (not run on unreadable or ungradable photos)."""
        return anatomy_rows(self.anatomy_detector, [p.pixels if isinstance(p, Preprocessed) and p.quality.gradable
                                                    else None for p in pre])

    def __call__(self, images: Sequence[bytes], with_probability: bool = False) -> list[PhotoResult]:
        """One request. Raises ImageError (every reason, "; "-joined) when no photo can be read, as the ensemble
        answers INVALID_ARGUMENT; otherwise a result per photo, an error report for the unreadable ones."""
        pre = self.preprocess(images)
        if all(isinstance(p, str) for p in pre):
            raise ImageError("; ".join(pre))
        anatomy = self.detect_anatomy(pre)
        out = self.predict(pre)

        def post(i: int) -> PhotoResult:
            if isinstance(pre[i], str):
                return PhotoResult(b"", error_report(i, pre[i]))
            result = postprocess(out[c.PROBABILITY][i], pre[i].geometry, float(out[c.THRESHOLD][i][0]),
                                 int(out[c.MODEL_VERSION][i][0]), self.postprocess_config, with_probability,
                                 Anatomy.from_vector(anatomy[i]), pre[i].quality)
            result.report["image_index"] = i
            return PhotoResult(result.mask_png, result.report, result.probability_png)

        return list(self.pool.map(post, range(len(pre))))

    def close(self) -> None:
        self.pool.shutdown()
