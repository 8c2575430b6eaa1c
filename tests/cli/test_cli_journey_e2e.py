"""End to end, the journey of issue 16 as a new user plays it, with `kubectl kubetune`
alone (kubectl finds the plugin on PATH) and only the rights of their own namespace
(the built-in `edit` role, which the chart extends to kubetune's kinds): from a JSONL
file on their laptop, its images in a folder beside it, to chatting with the tuned
model. Against the real API server, operator (under the chart's RBAC), local kubelet
and vLLM's CPU server; S3 is played by moto.

1. `dataset create` uploads the file and its images to the platform's dataset store;
2. `job create ... --deploy --follow` trains, follows the run and exits 0;
3. `job get` shows the evaluation, the tuned model beside its base;
4. `chat --image` answers from the tuned adapter, through the API server's proxy;
5. `deploy` puts the adapter on a server of the team's, behind an API key that `chat`
   reads from the team's Secret, and `chat --compare` asks the adapter and its base.

One training run (the tiny VLM, a few CPU steps); two vLLM servers: the run's own and
the team's (step 5 is what a team does next; it reuses the run, not a second one)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_support import RESTRICTED, restricted_operator
from kube import ROOT, Kubectl
from tiny_models import QUESTION, write_shapes_dataset

from kubetune_cli.output import percent

pytestmark = [pytest.mark.apiserver, pytest.mark.training]

RUN = "shapes-lora"
BUCKET = "kubetune-datasets"
# What the chart publishes for clients (templates/defaults.yaml) for release `kubetune`.
DEFAULTS_NAMESPACE, DEFAULTS = "kubetune-system", "kubetune-defaults"


def ml_engineer(kubectl: Kubectl, ns: str, out: Path) -> Path:
    """The kubeconfig of an ML engineer of namespace ``ns``: a token of a ServiceAccount
    bound there to the built-in `edit` role, which the chart's aggregated role extends
    to kubetune's kinds; and, as the chart grants every authenticated user, `get` on the
    platform's defaults ConfigMap."""
    kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {
                "name": "kubetune-edit",
                "labels": {
                    "rbac.authorization.k8s.io/aggregate-to-admin": "true",
                    "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                },
            },
            "rules": [
                {
                    "apiGroups": ["kubetune.io"],
                    "resources": ["datasets", "finetunejobs", "modeldeployments"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                }
            ],
        }
    )
    kubectl.run("create", "serviceaccount", "ml-engineer", "-n", ns)
    kubectl.run(
        "create",
        "rolebinding",
        "ml-engineer",
        "--clusterrole=edit",
        f"--serviceaccount={ns}:ml-engineer",
        "-n",
        ns,
    )
    token = kubectl.run(
        "create", "token", "ml-engineer", "-n", ns, "--duration", "2h"
    ).stdout.strip()
    cluster = yaml.safe_load(kubectl.kubeconfig.read_text())["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "ml-engineer", "user": {"token": token}}],
        "contexts": [
            {
                "name": "team",
                "context": {"cluster": cluster["name"], "user": "ml-engineer", "namespace": ns},
            }
        ],
        "current-context": "team",
    }
    out.write_text(yaml.safe_dump(config))
    return out


def platform_defaults(kubectl: Kubectl, s3_endpoint: str) -> None:
    """What the chart's `defaults` publish to clients, with the RBAC it gives them."""
    kubectl.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEFAULTS_NAMESPACE}}
    )
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": DEFAULTS, "namespace": DEFAULTS_NAMESPACE},
            "data": {
                "modelStore": "pvc://models/tuned",
                "modelStoreEndpoint": s3_endpoint,
                "datasetStore": f"s3://{BUCKET}/uploads",
            },
        }
    )
    for kind, body in (
        (
            "Role",
            {
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["configmaps"],
                        "resourceNames": [DEFAULTS],
                        "verbs": ["get"],
                    }
                ]
            },
        ),
        (
            "RoleBinding",
            {
                "subjects": [
                    {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Group",
                        "name": "system:authenticated",
                    }
                ],
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": f"{DEFAULTS}-reader",
                },
            },
        ),
    ):
        kubectl.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": kind,
                "metadata": {"name": f"{DEFAULTS}-reader", "namespace": DEFAULTS_NAMESPACE},
                **body,
            }
        )


def kubetune(config: Path, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`kubectl kubetune ARGV` as the user types it: kubectl finds `kubectl-kubetune` on
    PATH and hands it the arguments."""
    env = {**os.environ, "KUBECONFIG": str(config)}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["kubectl", "kubetune", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str], tail: Any = None) -> str:
    assert done.returncode == 0, (
        f"{' '.join(done.args)} exited {done.returncode}\nstdout:\n{done.stdout}\n"
        f"stderr:\n{done.stderr}\n{tail() if tail else ''}"
    )
    return done.stdout


def test_a_new_user_goes_from_a_local_file_to_chatting_with_the_tuned_model(
    kubectl: Kubectl,
    kubelet: Any,
    tiny_qwen2_5_vl: Path,
    s3_endpoint: str,
    tmp_path: Path,
) -> None:
    import boto3

    # The platform team's part: the base model on a claim, the stores, the operator.
    ns = kubectl.new_namespace("journey", RESTRICTED)
    shutil.copytree(tiny_qwen2_5_vl, kubelet.provide_claim(ns, "models") / "tiny-vlm")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    platform_defaults(kubectl, s3_endpoint)
    settings = {"KUBETUNE_DEFAULT_MODEL_STORE": "pvc://models/tuned"}
    (tmp_path / "operator").mkdir()
    with restricted_operator(kubectl, ns, tmp_path / "operator", settings) as operator:
        user = ml_engineer(kubectl, ns, tmp_path / "kubeconfig")
        laptop = tmp_path / "laptop"
        data = write_shapes_dataset(laptop, 6, seed=3, name="shapes.jsonl")
        line = json.loads(data.read_text().splitlines()[0])
        image, label = laptop / line["images"][0], line["messages"][-1]["content"]
        assert image.parent == laptop / "images"

        as_user = Kubectl(user)

        # 1. The file and the images beside it, to the team's bucket (a file this small
        # would go into a ConfigMap by itself); the pods read it with the team's key.
        as_user.run(
            "create",
            "secret",
            "generic",
            "team-s3",
            "--from-literal=AWS_ACCESS_KEY_ID=test",
            "--from-literal=AWS_SECRET_ACCESS_KEY=test",
        )
        ok(
            kubetune(
                user,
                "dataset",
                "create",
                "shapes",
                "-f",
                str(data),
                "--to",
                f"s3://{BUCKET}/team",
                "--s3-secret",
                "team-s3",
                "--wait",
            ),
            operator.tail,
        )
        dataset = kubectl.get("kds", "shapes", "-n", ns)
        assert dataset["status"]["phase"] == "Ready", dataset["status"]
        uri = dataset["spec"]["source"]["s3"]["uri"]
        assert uri.startswith(f"s3://{BUCKET}/team/{ns}/shapes/"), uri
        listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=BUCKET)
        keys = [o["Key"] for o in listed["Contents"]]
        assert any(k.endswith(f"/{line['images'][0]}") for k in keys), keys

        # 2. Train, evaluate and serve; follow it to the end.
        followed = ok(
            kubetune(
                user,
                "job",
                "create",
                RUN,
                "--base-model",
                "pvc://models/tiny-vlm",
                "--dataset",
                "shapes",
                "--validation-split",
                "0.25",
                "--epochs",
                "8",
                "--batch-size",
                "4",
                "--learning-rate",
                "0.002",
                "--max-pixels",
                "3136",
                "--gpus",
                "0",
                "--deploy",
                "--follow",
            ),
            operator.tail,
        )
        assert "Succeeded" in followed

        # 3. The evaluation, the tuned model beside its base.
        shown = ok(kubetune(user, "job", "get", RUN))
        evaluation = kubectl.get("ftj", RUN, "-n", ns)["status"]["evaluation"]
        assert evaluation["phase"] == "Succeeded", evaluation
        assert "Evaluation: Succeeded" in shown, shown
        scores = [percent(evaluation[m]["accuracy"]) or "" for m in ("tuned", "base")]
        row = r"exact match\s+" + r"\s+".join(map(re.escape, scores))
        assert re.search(row, shown), shown

        # 4. Ask the tuned adapter about an image of the training file.
        greedy = ("--temperature", "0", "--max-tokens", "16")
        asked = ok(
            kubetune(user, "chat", RUN, QUESTION, "--image", str(image), *greedy, "--wait"),
            operator.tail,
        )
        assert asked.strip() == label

        # 5. The team's server, behind a key in the team's Secret; the adapter and its
        # base side by side.
        as_user.run("create", "secret", "generic", "team-key", "--from-literal=apiKey=sk-team")
        deployed = ok(
            kubetune(
                user,
                "deploy",
                "team",
                "--adapter",
                RUN,
                "--gpus",
                "0",
                "--api-key-secret",
                "team-key",
                "--max-pixels",
                "3136",
                "--wait",
            ),
            operator.tail,
        )
        assert "Available: serves tiny-vlm, shapes-lora" in deployed
        both = ok(
            kubetune(
                user,
                "chat",
                RUN,
                QUESTION,
                "--image",
                str(image),
                *greedy,
                "--deployment",
                "team",
                "--compare",
                "-o",
                "json",
            )
        )
        tuned, base = json.loads(both)
        assert (tuned["model"], base["model"]) == (RUN, "tiny-vlm")
        assert tuned["choices"][0]["message"]["content"].strip() == label
        assert base["choices"][0]["message"]["content"].strip() != label
        # The key is the Secret's: another one is refused by the server.
        wrong = kubetune(user, "chat", RUN, QUESTION, "--deployment", "team", "--api-key", "nope")
        assert wrong.returncode == 1 and "refused the API key" in wrong.stderr
        # Without --deployment the model is served twice: the error names both.
        twice = kubetune(user, "chat", RUN, QUESTION)
        assert twice.returncode == 1 and f"({RUN}, team)" in twice.stderr, twice.stderr
