"""The service's contract: model and tensor names, batch limit, working size, report schema. Defined here only.

The model repository's config.pbtxt files are generated from these (`python -m fundus_hemorrhage.model_config
--write`; a test checks that the committed files match), and the Triton adapters, the client, training and
build_engines import them.

    client --IMAGE [N,1] bytes--> ENSEMBLE
      preprocess   IMAGE -> PIXELS [N,3,S,S] fp32, GEOMETRY [N,GEOMETRY_LENGTH] fp64, ERROR [N,1] bytes,
                   ANATOMY [N,ANATOMY_LENGTH] fp32 (optic disc and fovea on the working grid),
                   QUALITY [N,1] bytes (image-quality verdict, JSON: fundus_hemorrhage.quality)
      unet_router  PIXELS -> what unet returns, from the unet version it picks for the request (BLS; A/B split,
                   routing_key, unet_version: fundus_hemorrhage.routing)
        unet       PIXELS -> PROBABILITY [N,1,S,S] fp32, THRESHOLD [N,1] fp32, MODEL_VERSION [N,1] int32
      postprocess  PROBABILITY, THRESHOLD, MODEL_VERSION, GEOMETRY, ERROR, ANATOMY, QUALITY
                   -> MASK, LESIONS, PROBABILITY_PNG
    <--MASK [N,1] PNG bytes, LESIONS [N,1] JSON bytes, PROBABILITY [N,1] PNG bytes (b"" unless asked)--

    client --BASELINE [N,1], FOLLOW_UP [N,1] bytes--> PROGRESSION (Python backend, BLS into ENSEMBLE with the 2N
      photos, registration and change report: fundus_hemorrhage.registration, fundus_hemorrhage.progression)
    <--BASELINE_MASK, FOLLOW_UP_MASK [N,1] PNG, BASELINE_LESIONS, FOLLOW_UP_LESIONS [N,1] JSON (the single-visit
       reports), CHANGE_REPORT [N,1] JSON--

THRESHOLD and MODEL_VERSION are constants baked into each unet version's graph (build_engines), so the report
names the version that produced its probabilities and uses that version's threshold, whichever is served.
"""

from __future__ import annotations

from .anatomy_tensor import ANATOMY_LENGTH
from .geometry import GEOMETRY_LENGTH

ENSEMBLE = "hemorrhage_segmentation"
PREPROCESS = "preprocess"
SEGMENTATION_MODEL = "unet"
ROUTER = "unet_router"  # the ensemble's middle step: picks the unet version per request (A/B), calls it
POSTPROCESS = "postprocess"

PROGRESSION = "hemorrhage_progression"  # two visits of one eye: registration + change report (issue 22)

MAX_BATCH_SIZE = 16  # photos per request, and the unet's largest dynamic batch
WORKING_SIZE = 640  # side of the square working grid, pixels
# Photos of one request that a preprocess or postprocess instance (and Pipeline) works on at once: OpenCV, the
# decoders and zlib release the GIL, so one 10-photo request uses both cores of a 2-core machine.
STEP_THREADS = 2

# Ensemble inputs and outputs.
IMAGE = "IMAGE"
MASK = "MASK"
LESIONS = "LESIONS"
PROBABILITY = "PROBABILITY"
# Between the steps.
PIXELS = "PIXELS"
GEOMETRY = "GEOMETRY"
ERROR = "ERROR"
ANATOMY = "ANATOMY"
QUALITY = "QUALITY"  # {"gradable", "reasons", "exposure_gain"} JSON per photo; b"" for an unreadable one
THRESHOLD = "THRESHOLD"
MODEL_VERSION = "MODEL_VERSION"
PROBABILITY_PNG = "PROBABILITY_PNG"

# hemorrhage_progression's tensors: pairs of photos in, both visits' answers and the change report out.
BASELINE = "BASELINE"
FOLLOW_UP = "FOLLOW_UP"
BASELINE_MASK = "BASELINE_MASK"
FOLLOW_UP_MASK = "FOLLOW_UP_MASK"
BASELINE_LESIONS = "BASELINE_LESIONS"
FOLLOW_UP_LESIONS = "FOLLOW_UP_LESIONS"
CHANGE_REPORT = "CHANGE_REPORT"
# Pairs per progression request: both photos of every pair go to the ensemble in one request of <= MAX_BATCH_SIZE.
MAX_PAIRS = MAX_BATCH_SIZE // 2

# Request parameters of postprocess: also return PROBABILITY (round(255 p) as a PNG at the photo's size); or
# (false) leave MASK empty, for a client that asked for LESIONS only (the client library sets it from the outputs
# it requests; an ensemble step is always asked for all of its outputs, server#1201).
PROBABILITY_PARAMETER = "probability"
MASK_PARAMETER = "mask"
# Request parameters read by the router (fundus_hemorrhage.routing): pin a unet version; or a pseudonymous
# patient/study id that keeps its requests on one version while the traffic split is unchanged.
UNET_VERSION_PARAMETER = "unet_version"
ROUTING_KEY_PARAMETER = "routing_key"

# 2.0: 1.0's fields plus the clinician's frame (eye, optic_disc, fovea, scale, per-lesion zones, zone tables,
# findings) and image_quality (status "ungradable"); documented in the README.
REPORT_SCHEMA_VERSION = "2.0"

__all__ = [name for name in dir() if name.isupper()] + ["GEOMETRY_LENGTH", "ANATOMY_LENGTH"]
