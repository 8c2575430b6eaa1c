"""`kubectl kubetune chat`: one OpenAI chat completion from the ModelDeployment that
serves a model (a base model or an adapter), through the API server's service proxy,
so the kubeconfig's credentials are all it takes: no port-forward, no Ingress.

API keys. A ModelDeployment with auth.apiKeySecretRef answers only to its key. The key
is ``--api-key``, else the environment's KUBETUNE_API_KEY, else read from that Secret
(key apiKey) where the user may read it. It travels in the ``api-key`` header (the one
Azure OpenAI's clients send), not in Authorization: the API server authenticates the
caller with Authorization and removes it before it proxies the request."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from kubetune_cli.context import COMMAND_OPTIONS, Context
from kubetune_cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, api_message, error
from kubetune_operator.api.common import GROUP, VERSION
from kubetune_operator.api.modeldeployment import API_KEY_SECRET_KEY, MODEL_DEPLOYMENT
from kubetune_trainer.serving import guard

Manifest = dict[str, Any]

API_KEY_VARIABLE = "KUBETUNE_API_KEY"
API_KEY_HEADER = guard.API_KEY_HEADER.decode()
POLL_SECONDS = 2.0

EXAMPLES = """\
examples:
  # Ask the tuned adapter about a picture (the ModelDeployment is found by model name)
  kubectl kubetune chat shapes-lora "What shape is this?" --image square.png

  # The same question to the adapter and to its base model, side by side
  kubectl kubetune chat shapes-lora "What shape is this?" --image square.png --compare

  # A server of several teams, behind an API key you were given
  KUBETUNE_API_KEY=... kubectl kubetune chat captions "Describe it" --image a.jpg \\
      --deployment qwen-vl -o json
"""


class ChatError(CommandError):
    """The question cannot be asked, or was not answered; the message says why."""


# -- pure: which server, which URL, what body ----------------------------------------


def _served(md: Mapping[str, Any]) -> list[str]:
    return list((md.get("status") or {}).get("servedModels") or [])


def _name(md: Mapping[str, Any]) -> str:
    return str(md["metadata"]["name"])


def _why_not_served(md: Mapping[str, Any], model: str) -> str | None:
    """Why ``md`` is meant to serve ``model`` but does not (yet), or None when it is not
    meant to."""
    spec, status = md.get("spec") or {}, md.get("status") or {}
    for state in status.get("adapters") or []:
        if state.get("name") == model and state.get("reason"):
            return f"{state['reason']}: {state.get('message') or ''}".strip(": ")
    named = {a.get("name") for a in spec.get("adapters") or []}
    if model in named or (spec.get("baseModel") or {}).get("name") == model:
        return f"the server is {status.get('phase') or 'Pending'}: {status.get('message') or ''}"
    return None


def choose_deployment(
    model: str, deployments: Sequence[Mapping[str, Any]], namespace: str, named: str | None = None
) -> Mapping[str, Any]:
    """The ModelDeployment to ask: ``named``, or the one whose status lists ``model``
    among the models it serves. Anything else is an error that names the candidates."""
    if named is not None:
        md = next((d for d in deployments if _name(d) == named), None)
        if md is None:
            raise ChatError(f"ModelDeployment {named!r} not found in namespace {namespace!r}")
        if model not in _served(md):
            why = _why_not_served(md, model)
            if why is not None:
                raise ChatError(f"ModelDeployment {named!r} does not serve {model!r} yet: {why}")
            raise ChatError(
                f"ModelDeployment {named!r} does not serve {model!r}; it serves: "
                f"{', '.join(_served(md)) or 'nothing yet'}"
            )
        return md
    serving = [d for d in deployments if model in _served(d)]
    if len(serving) == 1:
        return serving[0]
    if serving:
        names = ", ".join(sorted(_name(d) for d in serving))
        raise ChatError(
            f"{model!r} is served by {len(serving)} ModelDeployments in namespace "
            f"{namespace!r} ({names}): choose one with --deployment"
        )
    waiting = [(d, why) for d in deployments if (why := _why_not_served(d, model)) is not None]
    if waiting:
        lines = "; ".join(f"ModelDeployment {_name(d)!r}: {why}" for d, why in waiting)
        raise ChatError(f"{model!r} is not served yet: {lines}")
    if not deployments:
        raise ChatError(f"no ModelDeployment in namespace {namespace!r} (try -n NAMESPACE)")
    listing = "; ".join(
        f"{_name(d)}: {', '.join(_served(d)) or 'nothing yet'}" for d in deployments
    )
    raise ChatError(
        f"no ModelDeployment in namespace {namespace!r} serves {model!r}; served: {listing}"
    )


def proxy_path(md: Mapping[str, Any], route: str) -> str:
    """The API server path that reaches ``route`` (e.g. /chat/completions) of the
    OpenAI base URL the operator published in status.endpoint
    (http://SERVICE.NAMESPACE.svc:PORT/v1), through the service proxy."""
    endpoint = (md.get("status") or {}).get("endpoint")
    if not endpoint:
        raise ChatError(f"ModelDeployment {_name(md)!r} has no endpoint in its status yet")
    url = urlsplit(endpoint)
    host = (url.hostname or "").split(".")
    if url.scheme not in ("http", "https") or len(host) < 3 or host[2] != "svc" or not url.port:
        raise ChatError(
            f"ModelDeployment {_name(md)!r}: endpoint {endpoint!r} is not a Service's "
            "http://SERVICE.NAMESPACE.svc:PORT/... address"
        )
    service, namespace = host[0], host[1]
    target = quote(f"{url.scheme}:{service}:{url.port}", safe=":")
    return (
        f"/api/v1/namespaces/{quote(namespace)}/services/{target}/proxy"
        f"{url.path.rstrip('/')}{route}"
    )


def image_uri(path: Path) -> str:
    """An image file as a data: URI, the form vLLM takes in an image_url part."""
    data = path.read_bytes()
    mime = _sniffed(data) or mimetypes.guess_type(path.name)[0]
    if mime is None or not mime.startswith("image/"):
        raise ChatError(f"--image {path}: not an image file this client recognises")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _sniffed(data: bytes) -> str | None:
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"BM", "image/bmp"),
    )
    for magic, mime in signatures:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def request_body(
    model: str,
    prompt: str,
    images: Sequence[str] = (),
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> Manifest:
    """An OpenAI chat completion request: the images (data: URIs) as image_url parts
    before the prompt, as the datasets' content-parts format writes them."""
    content: Any = prompt
    if images:
        content = [
            *({"type": "image_url", "image_url": {"url": uri}} for uri in images),
            {"type": "text", "text": prompt},
        ]
    messages: list[Manifest] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    body: Manifest = {"model": model, "messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def answer_text(response: Mapping[str, Any]) -> str:
    choices = response.get("choices") or []
    if not choices:
        raise ChatError(f"the server answered without a choice: {json.dumps(response)[:500]}")
    return str((choices[0].get("message") or {}).get("content") or "")


def base_model_of(md: Mapping[str, Any]) -> str:
    return str(((md.get("spec") or {}).get("baseModel") or {}).get("name") or "")


def refusal(status: int, body: str, md: str, sent_key: bool = False) -> str:
    """What went wrong, from a failed request's status and body: the API server's own
    Status (no ready pod, no right to the proxy), or the model server's OpenAI error."""
    try:
        parsed = json.loads(body)
    except (TypeError, ValueError):
        parsed = None
    if isinstance(parsed, dict) and parsed.get("kind") == "Status":
        message = parsed.get("message") or ""
        if status == 503:
            return f"ModelDeployment {md!r} has no ready server pod ({message})"
        if status == 403:
            return f"the API server refused the service proxy: {message}"
        return f"the API server answered {status}: {message}"
    message = ""
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = (
            (error.get("message") if isinstance(error, dict) else error)
            or parsed.get("message")
            or ""
        )
    message = message or (body or "")[:500]
    if status == 401 and sent_key:
        return f"ModelDeployment {md!r} refused the API key sent ({message})"
    if status == 401:
        return (
            f"ModelDeployment {md!r} wants an API key: pass --api-key or set "
            f"{API_KEY_VARIABLE} ({message})"
        )
    return f"the model server answered {status}: {message}"


# -- talking to the cluster -------------------------------------------------------------


@dataclass
class Server:
    """One ModelDeployment, reached through the service proxy."""

    context: Context
    md: Mapping[str, Any]
    api_key: str | None
    timeout: float

    def complete(self, body: Mapping[str, Any]) -> Manifest:
        from kubernetes.client.exceptions import ApiException

        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers[API_KEY_HEADER] = self.api_key
        try:
            response = self.context.api_client.call_api(
                proxy_path(self.md, "/chat/completions"),
                "POST",
                header_params=headers,
                body=dict(body),
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=(30, self.timeout),
            )
        except ApiException as exc:
            raise ChatError(
                refusal(exc.status, exc.body, _name(self.md), bool(self.api_key))
            ) from None
        answer: Manifest = json.loads(response.data)
        return answer


def list_deployments(context: Context) -> list[Manifest]:
    from kubernetes import client

    listed = client.CustomObjectsApi(context.api_client).list_namespaced_custom_object(
        GROUP, VERSION, context.namespace, MODEL_DEPLOYMENT.plural
    )
    items: list[Manifest] = listed.get("items") or []
    return items


def api_key_for(md: Mapping[str, Any], context: Context, given: str | None) -> str | None:
    """The API key to send: ``given`` (--api-key, else the environment's), else the one in
    the Secret the ModelDeployment names, if it names one; None where it needs none."""
    if given:
        return given
    ref = (((md.get("spec") or {}).get("auth") or {}).get("apiKeySecretRef") or {}).get("name")
    if not ref:
        return None
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        secret = client.CoreV1Api(context.api_client).read_namespaced_secret(ref, context.namespace)
    except ApiException as exc:
        raise ChatError(
            f"ModelDeployment {_name(md)!r} wants the API key in Secret {ref!r}, which you "
            f"cannot read ({exc.status} {exc.reason}): pass --api-key or set "
            f"{API_KEY_VARIABLE}"
        ) from None
    encoded = (secret.data or {}).get(API_KEY_SECRET_KEY)
    if not encoded:
        raise ChatError(f"Secret {ref!r} has no key {API_KEY_SECRET_KEY!r}")
    return base64.b64decode(encoded).decode()


# -- the command ------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat",
        parents=[COMMAND_OPTIONS],
        help="ask a served model (a base model or a tuned adapter) one question",
        description=(
            "Send one OpenAI chat completion to the ModelDeployment that serves MODEL, "
            "through the API server's service proxy, and print the answer."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="a served model: base model or adapter")
    parser.add_argument("prompt", metavar="PROMPT", help="the question")
    parser.add_argument(
        "--image",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="an image file to send with the question (as a data: URI); repeatable",
    )
    parser.add_argument(
        "--deployment",
        metavar="NAME",
        help="the ModelDeployment to ask (default: the one whose status serves MODEL)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also ask the adapter's base model the same, and print both answers",
    )
    parser.add_argument("--system", metavar="TEXT", help="a system message before the question")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="longest answer, in tokens")
    parser.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature (0: greedy)"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_VARIABLE) or None,
        help=f"the ModelDeployment's API key (default: ${API_KEY_VARIABLE}, else the Secret "
        "that its auth.apiKeySecretRef names, where you may read it)",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until a ModelDeployment serves MODEL (a run's own server starts when "
        "the run succeeds), up to --timeout",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        metavar="SECONDS",
        help="how long to wait for each answer, and with --wait for the server (default: 300)",
    )
    parser.set_defaults(run=run)


def _find(args: argparse.Namespace, context: Context) -> Mapping[str, Any]:
    """The ModelDeployment to ask; with --wait, the first one to serve the model within
    --timeout (a run that has just succeeded starts its server only then)."""
    deadline = time.monotonic() + args.timeout
    told = ""
    while True:
        try:
            return choose_deployment(
                args.model, list_deployments(context), context.namespace, args.deployment
            )
        except ChatError as exc:
            if not args.wait or time.monotonic() >= deadline:
                raise
            if str(exc) != told:
                print(f"waiting: {exc}", file=sys.stderr)
                told = str(exc)
        time.sleep(POLL_SECONDS)


def run(args: argparse.Namespace, context: Context) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        images = [image_uri(path) for path in args.image]
    except OSError as exc:
        error(f"--image: {exc}")
        return EXIT_USAGE
    except ChatError as exc:
        error(str(exc))
        return EXIT_USAGE
    try:
        md = _find(args, context)
        models = [args.model]
        if args.compare:
            base = base_model_of(md)
            if base == args.model:
                raise ChatError(f"{args.model!r} is the base model: --compare asks an adapter's")
            models.append(base)
        server = Server(context, md, api_key_for(md, context, args.api_key), args.timeout)
        answers = [
            server.complete(
                request_body(
                    model, args.prompt, images, args.system, args.max_tokens, args.temperature
                )
            )
            for model in models
        ]
        texts = [answer_text(answer) for answer in answers]
    except ChatError as exc:
        error(str(exc))
        return EXIT_FAILED
    except ApiException as exc:
        error(api_message(exc))
        return EXIT_FAILED
    raw: Any = answers if args.compare else answers[0]
    if context.output == "json":
        print(json.dumps(raw, indent=2))
    elif context.output == "yaml":
        print(yaml.safe_dump(raw, sort_keys=False), end="")
    elif args.compare:
        # Side by side, each answer indented under its model: a base model's answer may
        # be nothing but blank lines.
        for label, model, text in zip(("tuned", "base"), models, texts, strict=True):
            print(f"{model} ({label}):")
            print(textwrap.indent(text.strip() or "(an empty answer)", "  ", lambda _: True))
    else:
        print(texts[0])
    return EXIT_OK
