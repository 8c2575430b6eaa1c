"""The Job that validates a Dataset with `kubetune validate` before any GPU is booked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.resources.common import (
    IGNORE_DISRUPTIONS,
    LABEL_DATASET,
    LABEL_KUEUE_QUEUE,
    TERMINATION_LOG,
    TRAINER_SERVICE_ACCOUNT,
    Manifest,
    child_name,
    container_security_context,
    labels,
    owner_reference,
    pod_security_context,
)
from kubetune_operator.resources.storage import dataset_input

DATA_MOUNT = "/data"


def validation_job_name(dataset: str, generation: int) -> str:
    # One Job per spec generation: a changed spec is validated afresh, and a restarted
    # operator finds the Job it already made.
    return child_name(dataset, f"validate-{generation}")


def validate_args(spec: DatasetSpec, path: str, image_root: str | None) -> list[str]:
    limits = spec.limits
    args = [
        "validate",
        path,
        "--task",
        spec.task,
        "--json",
        "--summary-file",
        TERMINATION_LOG,
        "--min-examples",
        str(limits.min_examples),
        "--max-examples",
        str(limits.max_examples),
        "--max-images-per-example",
        str(limits.max_images_per_example),
        "--max-image-bytes",
        str(limits.max_image_bytes),
    ]
    if spec.format != "auto":
        args += ["--format", spec.format]
    if image_root is not None:
        args += ["--image-root", image_root]
    if limits.allow_remote_images:
        args.append("--allow-remote-images")
    if spec.deep:
        args.append("--deep")
    return args


def validation_job(dataset: Mapping[str, Any], spec: DatasetSpec, image: str) -> Manifest:
    """The Job for the Dataset ``dataset`` as it is now (``spec`` its spec, parsed)."""
    meta = dataset["metadata"]
    data = dataset_input("dataset", spec, DATA_MOUNT, image)
    name = validation_job_name(meta["name"], meta.get("generation", 1))
    job_labels = labels("dataset-validation", meta["name"], {LABEL_DATASET: meta["name"]})
    pod_labels = dict(job_labels)
    queue: Manifest = {}
    if spec.queue_name:
        # Kueue admits a queued Job by unsuspending it.
        job_labels[LABEL_KUEUE_QUEUE] = spec.queue_name
        queue = {"suspend": True}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": job_labels,
            "ownerReferences": [owner_reference(dataset)],
        },
        "spec": {
            **queue,
            # Validation is deterministic: a failure is the data's, not worth a retry. A
            # drained node's is not the data's: its pod is replaced.
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [IGNORE_DISRUPTIONS]},
            "activeDeadlineSeconds": 6 * 3600,
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(),
                    "initContainers": data.init_containers,
                    "containers": [
                        {
                            "name": "validate",
                            "image": image,
                            "command": ["kubetune"],
                            "args": validate_args(spec, data.path, data.image_root),
                            "env": [{"name": "HOME", "value": "/tmp"}, *data.env],
                            "resources": {
                                "requests": {"cpu": "500m", "memory": "512Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "terminationMessagePath": TERMINATION_LOG,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "volumeMounts": [*data.mounts, {"name": "tmp", "mountPath": "/tmp"}],
                            "securityContext": container_security_context(),
                        }
                    ],
                    "volumes": [*data.volumes, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
