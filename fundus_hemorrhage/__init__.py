"""Haemorrhage segmentation of retinal fundus photographs: the pure logic behind the Triton service.

    contract        model and tensor names, batch limit, working size, report schema (one source of truth)
    model_config    config.pbtxt files as protobuf (generated from the contract, read and written)
    geometry        the GEOMETRY tensor: where the working grid sits on the original photo
    preprocessing   bytes -> decode, field of view, crop, resize, CLAHE -> PIXELS + GEOMETRY
    postprocessing  PROBABILITY -> mask at the original size, lesions, report; png: the fast mask encoder
    onnx_session    the one ONNX Runtime session factory (serving, evaluation, int8 gate, benchmarks)
    pipeline        the serving path in one process: bytes -> preprocess -> model -> postprocess
    client          the tritonclient-based client library (segment.py is its command line)
    repository      the model repository on disk: versions and their model.json
    serving         what serve.py runs around tritonserver: launcher, admin API, watchdog, updates, drain
    engines         what build_engines.py runs: export, parity, int8, TensorRT, version folders

Importing this package imports nothing heavy; each module pulls in what it needs.
"""
