"""The few Kubernetes API calls the commands share, thin over the official client:
kubetune's objects by plural, and the core/v1 Events about one of them."""

from __future__ import annotations

import json
from typing import Any

from kubetune_cli.context import Context
from kubetune_cli.output import Manifest, parse_time
from kubetune_operator.api.common import GROUP, VERSION


def custom_objects(context: Context) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(context.api_client)


def core(context: Context) -> Any:
    from kubernetes import client

    return client.CoreV1Api(context.api_client)


def get(context: Context, plural: str, name: str) -> Manifest | None:
    """The object, or None where there is none of that name."""
    from kubernetes.client.exceptions import ApiException

    try:
        found: Manifest = custom_objects(context).get_namespaced_custom_object(
            GROUP, VERSION, context.namespace, plural, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


def list_objects(context: Context, plural: str) -> list[Manifest]:
    listed = custom_objects(context).list_namespaced_custom_object(
        GROUP, VERSION, context.namespace, plural
    )
    items: list[Manifest] = listed.get("items") or []
    return sorted(items, key=lambda o: o["metadata"]["name"])


def namespace_events(context: Context) -> list[Manifest]:
    """The namespace's Events, oldest first, as dicts in the API's own spelling
    (``involvedObject``, ``lastTimestamp``...): one list a poll, filtered here, so that
    a run's Events and those of its Jobs and pods come in one request."""
    listed = core(context).list_namespaced_event(context.namespace, _preload_content=False)
    items: list[Manifest] = json.loads(listed.data).get("items") or []
    return sorted(items, key=event_time)


def event_time(event: Manifest) -> str:
    """When an Event last happened, as an RFC 3339 string that sorts by time."""
    stamp = (
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )
    parsed = parse_time(stamp)
    return parsed.isoformat() if parsed else ""
