"""Haemorrhage segmentation of retinal fundus photographs: the runtime, what the Triton models and clients import.

    contract        model and tensor names, batch limit, working size, report schema (one source of truth)
    model_config    config.pbtxt files as protobuf (generated from the contract, read and written)
    geometry        the GEOMETRY tensor: where the working grid sits on the original photo
    preprocessing   bytes -> decode (jpeg, file_structure), field of view, quality gate, CLAHE -> PIXELS + GEOMETRY
    quality         the image-quality gate: exposure, focus, colour; exposure normalisation
    anatomy         optic disc and fovea detector (ANATOMY tensor, layout in anatomy_tensor)
    retinal_frame   the clinician's frame: laterality, disc-diameter ruler, retinal quadrants, ETDRS subfields
    postprocessing  PROBABILITY -> mask at the original size, lesions; report: the JSON report; png: mask encoder
    onnx_session    the one ONNX Runtime session factory (serving, evaluation, int8 gate, benchmarks)
    routing         A/B traffic split, sticky routing keys, version pins (used by model_repository/unet_router)
    backend         Python-backend glue (needs triton_python_backend_utils): the unet adapter every version's
                    model.py imports, the custom Prometheus metrics
    pipeline        the serving path in one process: bytes -> preprocess -> model -> postprocess
    client          the tritonclient-based client library (segment.py is its command line); overlay and
                    report_index draw the overlays and the batch's index.html

Layers, each importing only those below it:
    fundus_hemorrhage_perf      benchmarks (bench.py, locust, perf_analyzer)
    fundus_hemorrhage_ops       serve.py's supervisor and port guard (serving), build_engines.py (engines), the
                                traffic tool, a local serve.py for tests and benchmarks (local_server)
    fundus_hemorrhage_training  U-Net, MoCo, fine-tuning, evaluation, the run queue
    fundus_hemorrhage           this package: imports neither training nor operations

Importing this package imports nothing heavy; each module pulls in what it needs.
"""
