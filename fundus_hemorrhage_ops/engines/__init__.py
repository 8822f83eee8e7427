"""What build_engines.py runs, one concern per module:

    export          training checkpoint -> FP32 ONNX (PIXELS -> PROBABILITY), model.json's metadata
    identity        THRESHOLD and MODEL_VERSION baked into each version's graph
    parity          Polygraphy runners + Comparator (PyTorch vs ONNX Runtime), served-mask parity of a rebuild
    int8            static QDQ quantization and the int8 gate (val AUPR along the serving path)
    calibration     the int8 calibration photos (drawn from the manifest, recorded by id and SHA-256) and its
                    result, the calibration cache (calibration.json: scale and zero point per activation) rebuilds use
    plan            the preprocessing a version needs (model.json "preprocessing"), from PreprocessConfig
    tensorrt        FP16 TensorRT plan (GPU only), FP16 ONNX for strongly typed networks
    version_folder  the model repository on disk: versions, checkpoints, staging, model.json, config.pbtxt
    build           the build itself, step by step (build_engines.py is its command line)

Importing this package imports nothing heavy.
"""


class BuildError(Exception):
    """A build that must stop; the message is one line for the operator (build_engines.py exits 2)."""
