"""The training Job of a FineTuneJob: job.json in a ConfigMap, and a batch/v1 Job that
runs `kubetune train --config` on GPU nodes.

Follow a FineTuneJob from YAML to trainer: api/finetunejob.py (the spec) →
finetunejob/decide.py (when to create it) → plan() here (spec → TrainingConfig) →
training_job() (the Job) → kubetune_trainer.training.runner (what `kubetune train` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.resources.common import (
    IGNORE_DISRUPTIONS,
    LABEL_FINETUNEJOB,
    LABEL_KUEUE_QUEUE,
    METRICS_PORT_NAME,
    TERMINATION_LOG,
    TRAINER_SERVICE_ACCOUNT,
    Manifest,
    child_name,
    container_resources,
    container_security_context,
    labels,
    owner_reference,
    pod_security_context,
    scheduling,
)
from kubetune_operator.resources.platform import PodDefaults, output_storage
from kubetune_operator.resources.storage import (
    Mounted,
    base_model_input,
    dataset_input,
    output_location,
    remote_images_input,
)
from kubetune_trainer.contract.job import FINAL_EXIT_CODES, TrainingConfig, TrainValidation
from kubetune_trainer.contract.metrics import METRICS_PORT

CONFIG_DIR = "/etc/kubetune"
CONFIG_KEY = "job.json"
TRAIN_DATA = "/data/train"
VALIDATION_DATA = "/data/validation"
BASE_MODEL = "/models/base"
OUTPUT = "/output"
# torchrun's rendezvous on the first node, for runs on several nodes.
RENDEZVOUS_PORT = 29500
# Retries cover crashes and lost nodes; each retry resumes from the last checkpoint.
BACKOFF_LIMIT = 3
TRAINER_CONTAINER = "trainer"
# A pod the trainer ended with a final exit code fails the Job at once: a retry would
# book a GPU to fail the same way. A pod preempted, evicted or drained (the
# DisruptionTarget condition) is replaced without using up a retry, so a run on spot
# or preemptible GPUs survives any number of them. Only a single process per pod
# reports its exit code; torchrun exits 1 for any failed worker.
POD_FAILURE_POLICY = {
    "rules": [
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": TRAINER_CONTAINER,
                "operator": "In",
                "values": list(FINAL_EXIT_CODES),
            },
        },
        IGNORE_DISRUPTIONS,
    ]
}


@dataclass(frozen=True)
class Inputs:
    """What the training Job is built from: the FineTuneJob (its spec parsed) and the
    Ready Datasets it names."""

    finetunejob: Mapping[str, Any]
    spec: FineTuneJobSpec
    dataset: DatasetSpec
    dataset_sha256: str | None
    validation_dataset: DatasetSpec | None = None
    # The digests of each Dataset's http(s) images as validation fetched them; None
    # where its lines name none.
    remote_images_sha256: str | None = None
    validation_remote_images_sha256: str | None = None


def job_name(finetunejob: str) -> str:
    return child_name(finetunejob, "train")


def config_map_name(finetunejob: str) -> str:
    return child_name(finetunejob, "job")


@dataclass(frozen=True)
class Plan:
    """The FineTuneJob laid out for one pod: what it mounts, the job.json it reads, and
    where its output will be."""

    finetunejob: Mapping[str, Any]
    spec: FineTuneJobSpec
    mounted: Mounted
    config: TrainingConfig
    output_uri: str
    image: str


def plan(inputs: Inputs, default_image: str) -> Plan:
    spec = inputs.spec
    image = spec.image or default_image
    mounted = Mounted(path=CONFIG_DIR)
    train = dataset_input(
        "train-data", inputs.dataset, TRAIN_DATA, image, inputs.remote_images_sha256
    )
    mounted.merge(train)
    validation: TrainValidation | None = None
    if spec.validation is not None and spec.validation.split is not None:
        validation = TrainValidation(split=spec.validation.split)
    elif spec.validation is not None and inputs.validation_dataset is not None:
        val = dataset_input(
            "validation-data",
            inputs.validation_dataset,
            VALIDATION_DATA,
            image,
            inputs.validation_remote_images_sha256,
        )
        mounted.merge(val)
        validation = TrainValidation(
            dataset=val.path, image_root=val.image_root, limits=inputs.validation_dataset.limits
        )
    remote_images: str | None = None
    if inputs.remote_images_sha256 or inputs.validation_remote_images_sha256:
        fetched = remote_images_input()
        mounted.merge(fetched)
        remote_images = fetched.path
    base = base_model_input(spec.base_model, BASE_MODEL, image)
    mounted.merge(base)
    storage = output_storage(spec)
    output, uri = output_location(storage, OUTPUT)
    s3 = storage.s3
    mounted.merge(output)
    optional: dict[str, Any] = {}
    if spec.preserve_general_skills is not None:
        optional["preserve_general_skills"] = spec.preserve_general_skills
    config = TrainingConfig(
        **optional,
        base_model=base.path,
        method=spec.method,
        tuning=spec.tuning,
        dataset=train.path,
        dataset_sha256=inputs.dataset_sha256,
        image_root=train.image_root,
        dataset_limits=inputs.dataset.limits,
        remote_images=remote_images,
        validation=validation,
        hyperparameters=spec.hyperparameters,
        early_stopping=spec.early_stopping,
        output_dir=output.path,
        output_uri=s3.uri if s3 is not None else None,
        # Checkpoints in the pod's emptyDir die with the pod: copies in S3 let a
        # replacement pod (after preemption) resume.
        checkpoint_uri=f"{s3.uri.rstrip('/')}/checkpoints" if s3 is not None else None,
        trust_remote_code=spec.base_model.trust_remote_code,
        metrics_port=METRICS_PORT,
        termination_log=TERMINATION_LOG,
    )
    return Plan(inputs.finetunejob, spec, mounted, config, uri, image)


def config_map(plan: Plan) -> Manifest:
    """job.json: the FineTuneJob spec as the trainer's TrainingConfig."""
    ftj = plan.finetunejob
    meta = ftj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels("training", meta["name"], {LABEL_FINETUNEJOB: meta["name"]}),
            "ownerReferences": [owner_reference(ftj)],
        },
        "data": {
            CONFIG_KEY: plan.config.model_dump_json(by_alias=True, exclude_none=True, indent=2)
        },
    }


def trainer_command(gpus: int, nodes: int = 1, job: str = "") -> Manifest:
    """One process per GPU. Several GPUs on one node train data-parallel under
    torchrun; several nodes are the pods of an Indexed Job, each torchrun knowing its
    node rank from its completion index and meeting the others at the first pod
    (`<job>-0.<job>`, through the headless Service of that name)."""
    train = ["train", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"]
    if nodes > 1:
        return {
            "command": ["torchrun"],
            "args": [
                f"--nnodes={nodes}",
                f"--nproc_per_node={max(gpus, 1)}",
                "--node_rank=$(JOB_COMPLETION_INDEX)",
                f"--master_addr={job}-0.{job}",
                f"--master_port={RENDEZVOUS_PORT}",
                "--no-python",
                "kubetune",
                *train,
            ],
        }
    if gpus <= 1:
        return {"command": ["kubetune"], "args": train}
    return {
        "command": ["torchrun"],
        "args": ["--standalone", f"--nproc_per_node={gpus}", "--no-python", "kubetune", *train],
    }


def rendezvous_service(plan: Plan) -> Manifest:
    """The headless Service that gives each pod of a multi-node run a DNS name
    (`<job>-<index>.<job>`), resolvable before the pods are ready."""
    meta = plan.finetunejob["metadata"]
    name = job_name(meta["name"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels("training", meta["name"], {LABEL_FINETUNEJOB: meta["name"]}),
            "ownerReferences": [owner_reference(plan.finetunejob)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def training_job(plan: Plan, pod_defaults: PodDefaults | None = None) -> Manifest:
    ftj = plan.finetunejob
    meta = ftj["metadata"]
    spec, mounted, image = plan.spec, plan.mounted, plan.image
    nodes = spec.resources.nodes
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "initContainers": mounted.init_containers,
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": image,
                **trainer_command(spec.resources.gpus, nodes, job_name(meta["name"])),
                "env": [
                    {"name": "HOME", "value": "/tmp"},
                    {"name": "HF_HOME", "value": "/tmp/hf"},
                    {"name": "PYTHONUNBUFFERED", "value": "1"},
                    *mounted.env,
                ],
                "ports": [
                    {"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"},
                    *(
                        [
                            {
                                "name": "rendezvous",
                                "containerPort": RENDEZVOUS_PORT,
                                "protocol": "TCP",
                            }
                        ]
                        if nodes > 1
                        else []
                    ),
                ],
                "resources": container_resources(spec.resources),
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    *mounted.mounts,
                ],
                "securityContext": container_security_context(),
            }
        ],
        "volumes": [
            {"name": "job-config", "configMap": {"name": config_map_name(meta["name"])}},
            {"name": "tmp", "emptyDir": {}},
            # Data loader workers share tensors through /dev/shm, which is tiny by default.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            *mounted.volumes,
        ],
    }
    pod_spec |= scheduling(spec.resources)
    job_spec: Manifest = {}
    if nodes > 1:
        # All the nodes' pods run at once, each with its own completion index (its node
        # rank) and hostname; the subdomain is rendezvous_service's.
        pod_spec["subdomain"] = job_name(meta["name"])
        job_spec = {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes}
    return run_job(
        ftj,
        spec,
        "training",
        job_name(meta["name"]),
        {
            **job_spec,
            "backoffLimit": BACKOFF_LIMIT,
            # Kueue admits a queued Job by unsuspending it; a suspended FineTuneJob too.
            "suspend": bool(spec.queue_name) or spec.suspend,
        },
        pod_spec,
        pod_defaults or PodDefaults(),
        # For a Prometheus that discovers pods by annotation; the chart's PodMonitor
        # finds them by label.
        annotations={
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(METRICS_PORT),
            "prometheus.io/path": "/metrics",
        },
    )


def run_job(
    ftj: Mapping[str, Any],
    spec: FineTuneJobSpec,
    component: str,
    name: str,
    job_spec: Manifest,
    pod_spec: Manifest,
    pod_defaults: PodDefaults,
    annotations: Mapping[str, str] | None = None,
) -> Manifest:
    """A Job of the run (its pre-flight, training or evaluation): labelled and owned by
    the FineTuneJob, with the pod failure policy and the platform's pod defaults; the
    queue's label only on the Job, where Kueue looks for it."""
    meta = ftj["metadata"]
    extra = {LABEL_FINETUNEJOB: meta["name"]}
    if spec.queue_name:
        extra[LABEL_KUEUE_QUEUE] = spec.queue_name
    job_labels = labels(component, meta["name"], extra)
    template: Manifest = {"labels": {k: v for k, v in job_labels.items() if k != LABEL_KUEUE_QUEUE}}
    if annotations:
        template["annotations"] = dict(annotations)
    return pod_defaults.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": job_labels,
                "ownerReferences": [owner_reference(ftj)],
            },
            "spec": {
                **job_spec,
                "podFailurePolicy": POD_FAILURE_POLICY,
                "template": {"metadata": template, "spec": pod_spec},
            },
        }
    )
