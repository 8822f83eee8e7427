"""Haemorrhage segmentation of retinal fundus photographs: the pure logic behind the Triton service.

    contract        model and tensor names, batch limit, working size, report schema (one source of truth)
    model_config    config.pbtxt files as protobuf (generated from the contract, read and written)
    geometry        the GEOMETRY tensor: where the working grid sits on the original photo
    preprocessing   bytes -> decode (jpeg, file_structure), field of view, quality gate, CLAHE -> PIXELS + GEOMETRY
    quality         the image-quality gate: exposure, focus, colour; exposure normalisation
    anatomy         optic disc and fovea detector (ANATOMY tensor, layout in anatomy_tensor)
    retinal_frame   the clinician's frame: laterality, disc-diameter ruler, retinal quadrants, ETDRS subfields
    postprocessing  PROBABILITY -> mask at the original size, lesions; report: the JSON report; png: mask encoder
    onnx_session    the one ONNX Runtime session factory (serving, evaluation, int8 gate, benchmarks)
    onnxruntime_unet  the Triton adapter every unet version's model.py imports
    routing         A/B traffic split, sticky routing keys, version pins (used by model_repository/unet_router)
    metrics         the custom Prometheus metrics of the Python-backend models
    pipeline        the serving path in one process: bytes -> preprocess -> model -> postprocess
    client          the tritonclient-based client library (segment.py is its command line); overlay and
                    report_index draw the overlays and the batch's index.html
    serving         what serve.py runs around tritonserver: launcher, port guard, admin API, watchdog, updates,
                    traffic, drain
    engines         what build_engines.py runs: export, parity, int8, TensorRT, version folders, the identity

Importing this package imports nothing heavy; each module pulls in what it needs.
"""
