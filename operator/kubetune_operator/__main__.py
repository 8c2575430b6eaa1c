"""`python -m kubetune_operator`: run the operator.

python -m kubetune_operator --namespace team-a --namespace team-b
python -m kubetune_operator --all-namespaces --standalone --metrics-port 8080
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import kopf
from prometheus_client import start_http_server

import kubetune_operator.handlers  # noqa: F401  (registers the handlers)
from kubetune_operator.handlers.context import MEMO_KEY, Context
from kubetune_operator.handlers.startup import HANDLER_THREADS
from kubetune_operator.kube import Api, load_config
from kubetune_operator.settings import add_arguments, from_arguments


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetune-operator", description="The kubetune operator.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable; globs allowed)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--standalone", action="store_true", help="no peering: this is the only operator instance"
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="liveness endpoint URL ('' disables)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="port of the operator's /metrics (0 disables)",
    )
    add_arguments(parser)
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = from_arguments(args)
    except ValueError as e:
        # A policy it cannot enforce as written: better no operator than a looser one.
        sys.exit(f"kubetune-operator: {e}")
    if not settings.admin_key:
        # Without it the operator could not reach the adapter routes of the servers it
        # starts, and a key made up here would not survive its restart.
        sys.exit(
            "kubetune-operator: no admin key: set KUBETUNE_ADMIN_KEY (the Helm chart keeps "
            "one in a Secret) or pass --admin-key"
        )
    if args.metrics_port:
        start_http_server(args.metrics_port)
    load_config()
    context = Context(api=Api.connect(threads=HANDLER_THREADS), settings=settings)

    namespaces = args.namespace or (
        [] if args.all_namespaces else [os.environ.get("KUBETUNE_NAMESPACE", "default")]
    )
    kopf.run(
        standalone=args.standalone,
        clusterwide=args.all_namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
        # Every handler finds the Context in its memo: kopf gives each object a shallow
        # copy of this one.
        memo=kopf.Memo({MEMO_KEY: context}),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
