"""What every command needs from kubectl's global options: an API client for the
chosen kubeconfig and context, the namespace, and the output format."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

OUTPUT_FORMATS = ("table", "json", "yaml")
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def global_options(*, defaults: bool) -> argparse.ArgumentParser:
    """kubectl's own flags, with kubectl's names, so that a plugin call reads like any
    other kubectl call. kubectl hands every argument to a plugin as it is, so they are
    accepted before the command (the root parser, ``defaults=True``) and after it (each
    command's parser, as a parent; there ``defaults=False``, or argparse would let a
    command's default overwrite what was given before the command)."""
    parser = argparse.ArgumentParser(add_help=False)

    def default(value: str | None) -> str | None:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("kubectl options")
    group.add_argument(
        "--kubeconfig", default=default(None), help="path to the kubeconfig file to use"
    )
    group.add_argument("--context", default=default(None), help="the kubeconfig context to use")
    group.add_argument(
        "-n",
        "--namespace",
        default=default(None),
        help="the namespace to work in (default: the context's namespace, else 'default')",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default=default("table"),
        help="output format (default: table)",
    )
    return parser


COMMAND_OPTIONS = global_options(defaults=False)
"""The parent every command's parser names: ``parents=[COMMAND_OPTIONS]``."""


class Context:
    """The connection a command works through: the namespace and output format at
    once, the API client when first used (so that ``--dry-run=client``, which talks
    to no server, needs no reachable cluster)."""

    def __init__(
        self,
        api_client: Any = None,
        namespace: str = "default",
        output: str = "table",
        connect: Callable[[], Any] | None = None,
    ) -> None:
        self._api_client = api_client
        self._connect = connect
        self.namespace = namespace
        self.output = output

    @property
    def api_client(self) -> Any:  # kubernetes.client.ApiClient
        if self._api_client is None:
            if self._connect is None:
                raise RuntimeError("this Context was made without a cluster to connect to")
            self._api_client = self._connect()
        return self._api_client

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        """kubectl's rules: the kubeconfig (--kubeconfig, else $KUBECONFIG, else
        ~/.kube/config) and its context (--context, else the current one), whose
        namespace is the default; without a kubeconfig, the pod's service account."""
        from kubernetes import client, config

        kubeconfig, chosen = args.kubeconfig, args.context
        namespace = args.namespace
        try:
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except config.ConfigException:
            if kubeconfig or chosen:
                raise
            contexts, active = None, None
        if contexts is None:
            # Inside a pod, as kubectl does: the service account's cluster and namespace.
            def in_cluster() -> Any:
                config.load_incluster_config()
                return client.ApiClient()

            if namespace is None:
                try:
                    with open(SERVICE_ACCOUNT_NAMESPACE) as f:
                        namespace = f.read().strip()
                except OSError:
                    namespace = None
            return cls(namespace=namespace or "default", output=args.output, connect=in_cluster)
        if chosen:
            found = next((c for c in contexts if c["name"] == chosen), None)
            if found is None:
                raise config.ConfigException(f"context {chosen!r} not found in the kubeconfig")
            active = found
        if namespace is None:
            namespace = (active or {}).get("context", {}).get("namespace")

        def from_kubeconfig() -> Any:
            return config.new_client_from_config(config_file=kubeconfig, context=chosen)

        return cls(namespace=namespace or "default", output=args.output, connect=from_kubeconfig)
