"""`kubectl kubetune chat`, the pure part: which ModelDeployment answers a model name,
the service-proxy path to it, the request, and what a refusal means."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_cli.chat import (
    ChatError,
    answer_text,
    choose_deployment,
    image_uri,
    proxy_path,
    refusal,
    request_body,
)


def md(name: str, served: list[str], **extra: Any) -> dict[str, Any]:
    status = {
        "phase": "Available",
        "endpoint": f"http://{name}.team.svc:8000/v1",
        "servedModels": served,
        **extra.pop("status", {}),
    }
    return {
        "metadata": {"name": name, "namespace": "team"},
        "spec": {"baseModel": {"name": served[0] if served else "base"}, **extra},
        "status": status,
    }


SHARED = md("qwen-vl", ["qwen", "alpha", "beta"])
OWN = md("alpha", ["qwen", "alpha"])


def test_the_one_server_that_serves_the_model_answers() -> None:
    assert choose_deployment("beta", [SHARED, OWN], "team") is SHARED


def test_a_model_served_twice_needs_deployment_and_the_error_names_both() -> None:
    with pytest.raises(
        ChatError, match=r"served by 2 ModelDeployments .*\(alpha, qwen-vl\).*--deployment"
    ):
        choose_deployment("alpha", [SHARED, OWN], "team")
    assert choose_deployment("alpha", [SHARED, OWN], "team", named="alpha") is OWN


def test_a_model_nobody_serves_lists_what_is_served() -> None:
    with pytest.raises(ChatError) as error:
        choose_deployment("gamma", [SHARED, OWN], "team")
    assert str(error.value) == (
        "no ModelDeployment in namespace 'team' serves 'gamma'; served: "
        "qwen-vl: qwen, alpha, beta; alpha: qwen, alpha"
    )
    with pytest.raises(ChatError, match="no ModelDeployment in namespace 'team' "):
        choose_deployment("gamma", [], "team")


def test_an_adapter_not_loaded_yet_says_why() -> None:
    waiting = md(
        "qwen-vl",
        ["qwen"],
        adapters=[{"name": "gamma", "fineTuneJob": "gamma"}],
        status={
            "adapters": [
                {"name": "gamma", "reason": "WaitingForFineTuneJob", "message": "now Running"}
            ]
        },
    )
    with pytest.raises(ChatError) as error:
        choose_deployment("gamma", [waiting, OWN], "team")
    assert str(error.value) == (
        "'gamma' is not served yet: ModelDeployment 'qwen-vl': WaitingForFineTuneJob: now Running"
    )
    with pytest.raises(ChatError, match="does not serve 'gamma' yet: WaitingForFineTuneJob"):
        choose_deployment("gamma", [waiting], "team", named="qwen-vl")


def test_a_server_still_loading_its_base_model_says_so() -> None:
    starting = md("qwen-vl", [], status={"phase": "Progressing", "message": "0/1 replicas ready"})
    starting["spec"]["baseModel"]["name"] = "qwen"
    with pytest.raises(ChatError, match="the server is Progressing: 0/1 replicas ready"):
        choose_deployment("qwen", [starting], "team")


def test_a_named_deployment_must_exist_and_serve_the_model() -> None:
    with pytest.raises(ChatError, match="'nope' not found in namespace 'team'"):
        choose_deployment("alpha", [SHARED], "team", named="nope")
    with pytest.raises(ChatError, match="'alpha' does not serve 'beta'; it serves: qwen, alpha"):
        choose_deployment("beta", [OWN], "team", named="alpha")


def test_the_request_goes_through_the_service_proxy_to_the_published_endpoint() -> None:
    assert proxy_path(SHARED, "/chat/completions") == (
        "/api/v1/namespaces/team/services/http:qwen-vl:8000/proxy/v1/chat/completions"
    )


@pytest.mark.parametrize(
    "endpoint", [None, "http://10.0.0.1:8000/v1", "http://qwen-vl.team.svc/v1", "ftp://a.b.svc:1/"]
)
def test_an_endpoint_that_is_not_a_service_address_is_an_error(endpoint: str | None) -> None:
    with pytest.raises(ChatError):
        proxy_path(md("x", ["m"], status={"endpoint": endpoint}), "/chat/completions")


def test_images_go_as_data_uris_in_image_url_parts_before_the_prompt(tmp_path: Path) -> None:
    from PIL import Image

    png, jpeg = tmp_path / "a.png", tmp_path / "b.photo"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(png)
    Image.new("RGB", (8, 8), (0, 0, 200)).save(jpeg, "JPEG")
    uris = [image_uri(png), image_uri(jpeg)]
    assert uris[0] == "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    assert uris[1].startswith("data:image/jpeg;base64,")  # by its bytes, not its name
    body = request_body(
        "alpha", "What shape?", uris, system="Be brief.", max_tokens=8, temperature=0
    )
    assert body == {
        "model": "alpha",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uris[0]}},
                    {"type": "image_url", "image_url": {"url": uris[1]}},
                    {"type": "text", "text": "What shape?"},
                ],
            },
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    assert request_body("alpha", "hi") == {
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_a_file_that_is_no_image_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(ChatError, match="not an image"):
        image_uri(notes)


def test_refusals_say_whose_they_are() -> None:
    status = {"kind": "Status", "message": 'no endpoints available for service "qwen-vl"'}
    assert refusal(503, json.dumps(status), "qwen-vl").startswith(
        "ModelDeployment 'qwen-vl' has no ready server pod"
    )
    forbidden = {"kind": "Status", "message": 'cannot create resource "services/proxy"'}
    assert "refused the service proxy" in refusal(403, json.dumps(forbidden), "qwen-vl")
    guard = {"error": {"message": "missing or wrong API key", "code": 401}}
    assert "--api-key" in refusal(401, json.dumps(guard), "qwen-vl")
    assert refusal(401, json.dumps(guard), "qwen-vl", sent_key=True) == (
        "ModelDeployment 'qwen-vl' refused the API key sent (missing or wrong API key)"
    )
    vllm = {"object": "error", "message": "The model `gamma` does not exist.", "code": 404}
    assert refusal(404, json.dumps(vllm), "qwen-vl") == (
        "the model server answered 404: The model `gamma` does not exist."
    )
    assert refusal(502, "bad gateway", "qwen-vl") == "the model server answered 502: bad gateway"


def test_the_answer_is_the_first_choices_message() -> None:
    assert answer_text({"choices": [{"message": {"content": "red square"}}]}) == "red square"
    with pytest.raises(ChatError):
        answer_text({"choices": []})
