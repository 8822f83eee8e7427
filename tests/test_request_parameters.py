"""Request parameters are checked where the ensemble first reads them (unet_router, with
fundus_hemorrhage.routing.request_parameters): a bad or unknown one is refused with INVALID_ARGUMENT naming it and
why, and the server keeps serving. Before (issue 23), bytes that are not UTF-8 in an HTTP request's parameters
raised UnicodeDecodeError inside unet_router (HTTP 500, a traceback in the answer)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.routing import MAX_ROUTING_KEY_CHARS, ParameterError, request_parameters

from conftest import SAMPLE_PHOTOS, infer, make_client


@pytest.mark.parametrize("raw, expected", [
    (None, {}), ("", {}), ("{}", {}),
    ('{"probability": true}', {"probability": True}), ('{"probability": "Yes"}', {"probability": True}),
    ('{"probability": 0}', {"probability": False}), ('{"probability": "false"}', {"probability": False}),
    ('{"mask": false}', {"mask": False}), ('{"mask": "true"}', {"mask": True}),
    ('{"unet_version": 3}', {"unet_version": 3}), ('{"unet_version": " 2 "}', {"unet_version": 2}),
    ('{"routing_key": "patient-7"}', {"routing_key": "patient-7"}), ('{"routing_key": 42}', {"routing_key": "42"}),
    ('{"routing_key": ""}', {"routing_key": ""}), ('{"routing_key": "ä"}', {"routing_key": "ä"}),
])
def test_good_parameters_are_read(raw, expected):
    assert request_parameters(raw) == expected


@pytest.mark.parametrize("raw, name, words", [
    (b'{"routing_key": "\xff\xfe"}', "routing_key", "not UTF-8"),
    (b'{"routing_key": "\xed\xb3\xbf"}', "routing_key", "not UTF-8"),  # what Triton makes of a "\udcff" escape
    ('{"routing_key": "\\udcff"}', "routing_key", "not UTF-8"),
    (b'{"\xff": 1}', "\\xff", "name is not UTF-8"),
    ('{"probability": 2}', "probability", "not true or false"),
    ('{"probability": "maybe"}', "probability", "not true or false"),
    ('{"unet_version": 0}', "unet_version", "not a version number"),
    ('{"unet_version": "abc"}', "unet_version", "not a version number"),
    ('{"unet_version": true}', "unet_version", "not a version number"),
    ('{"unet_version": 2.5}', "unet_version", "not a version number"),
    ('{"routing_key": true}', "routing_key", "not text"),
    ('{"routing_key": 1.5}', "routing_key", "not text"),
    (json.dumps({"routing_key": "k" * (MAX_ROUTING_KEY_CHARS + 1)}), "routing_key", "over the limit"),
    ('{"unet-version": 2}', "unet-version", "unknown parameter; accepted: probability, mask, routing_key, unet_version"),
])
def test_bad_parameters_are_refused_naming_them(raw, name, words):
    with pytest.raises(ParameterError) as refused:
        request_parameters(raw)
    assert refused.value.name == name and words in str(refused.value)
    assert str(refused.value).startswith(f"request parameter {name!r}: ")


def test_a_router_split_key_stays_the_same_after_the_check():
    from fundus_hemorrhage.routing import choose, parse_traffic
    split = parse_traffic("3:70,2:30")
    assert choose(split, request_parameters('{"routing_key": "patient-1"}')["routing_key"]) == choose(split,
                                                                                                     "patient-1")


def _post(server, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{c.ENSEMBLE}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _json_request(parameters: bytes) -> bytes:
    # A JSON string "data" is taken as the photo's bytes: 'x' is an unreadable photo, answered per photo (200) when
    # the parameters are good, so any refusal below comes from the parameters.
    return (b'{"parameters":' + parameters + b',"inputs":[{"name":"IMAGE","shape":[1,1],"datatype":"BYTES",'
            b'"data":["x"]}]}')


def _serves_a_photo(server) -> None:
    client = make_client(server, "grpc")
    try:
        result = infer(client, "grpc", [SAMPLE_PHOTOS[0].read_bytes()])
        assert json.loads(result.as_numpy(c.LESIONS)[0, 0])["status"] == "ok"
    finally:
        client.close()


@pytest.mark.parametrize("parameters, name, words", [
    (b'{"routing_key":"\xff\xfe"}', "routing_key", "not UTF-8"),
    (b'{"routing_key":"\\udcff"}', "routing_key", "not UTF-8"),
    (b'{"unet_version":"two"}', "unet_version", "not a version number"),
    (b'{"probability":"perhaps"}', "probability", "not true or false"),
    (b'{"colour":"red"}', "colour", "unknown parameter"),
])
def test_http_bad_parameters_get_400_naming_them(triton_server, parameters, name, words):
    assert _post(triton_server, _json_request(b'{"routing_key":"ok"}'))[0] == 200
    status, body = _post(triton_server, _json_request(parameters))
    assert status == 400, body
    error = json.loads(body)["error"]
    assert f"request parameter '{name}'" in error and words in error and "Traceback" not in error, error
    assert "UnicodeDecodeError" not in error
    _serves_a_photo(triton_server)


@pytest.mark.parametrize("parameters, name, words", [
    ({"unet-version": 2}, "unet-version", "unknown parameter"),
    ({"probability": "perhaps"}, "probability", "not true or false"),
    ({"mask": "none"}, "mask", "not true or false"),
    ({"routing_key": 1.5}, "routing_key", "not text"),
    ({"routing_key": "k" * 300}, "routing_key", "over the limit"),
    ({"unet_version": 0}, "unet_version", "not a version number"),
])
def test_grpc_bad_parameters_get_invalid_argument_naming_them(triton_server, parameters, name, words):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        image = grpcclient.InferInput(c.IMAGE, [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
        with pytest.raises(InferenceServerException) as refused:
            client.infer(c.ENSEMBLE, [image], parameters=parameters)
    finally:
        client.close()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"request parameter '{name}'" in refused.value.message() and words in refused.value.message()
    _serves_a_photo(triton_server)


def test_grpc_bytes_that_are_not_utf8_are_refused_by_triton_before_any_model(triton_server):
    """tritonclient refuses a bytes parameter itself; a hand-made message with a string_param that is not UTF-8
    is refused by Triton's gRPC frontend (protobuf's UTF-8 check): INTERNAL "Unable to parse request"."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    image = grpcclient.InferInput(c.IMAGE, [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not supported"):
        client.infer(c.ENSEMBLE, [image], parameters={"routing_key": b"\xff\xfe"})
    client.close()
    request = service_pb2.ModelInferRequest(model_name=c.ENSEMBLE)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = c.IMAGE, "BYTES"
    tensor.shape.extend([1, 1])
    request.raw_input_contents.append((1).to_bytes(4, "little") + b"x")
    request.parameters["routing_key"].string_param = "@@@@"
    message = request.SerializeToString().replace(b"@@@@", b"\xff\xfeAB")
    with grpc.insecure_channel(triton_server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda m: m,
                                   response_deserializer=service_pb2.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as refused:
            call(message, timeout=60)
    assert refused.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert "parse" in (refused.value.details() or "")
    _serves_a_photo(triton_server)


def test_a_client_that_asks_for_lesions_only_gets_the_same_reports_and_no_mask_is_encoded(triton_server):
    """The client library turns "outputs without MASK" into mask=false: the reports are the full request's, MASK is
    empty when it is requested anyway with mask=false."""
    from fundus_hemorrhage import client as service

    photos = [p.read_bytes() for p in SAMPLE_PHOTOS[:2]]
    client = make_client(triton_server, "grpc")
    try:
        full = service.infer(client, "grpc", photos)
        lesions_only = service.infer(client, "grpc", photos, outputs=[c.LESIONS])
        asked_anyway = service.infer(client, "grpc", photos, parameters={c.MASK_PARAMETER: False})
    finally:
        client.close()
    assert lesions_only.as_numpy(c.MASK) is None
    assert lesions_only.as_numpy(c.LESIONS).tolist() == full.as_numpy(c.LESIONS).tolist()
    assert asked_anyway.as_numpy(c.LESIONS).tolist() == full.as_numpy(c.LESIONS).tolist()
    assert all(len(m) > 100 for m in full.as_numpy(c.MASK).reshape(-1))
    assert asked_anyway.as_numpy(c.MASK).reshape(-1).tolist() == [b"", b""]
