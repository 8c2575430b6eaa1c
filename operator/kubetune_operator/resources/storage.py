"""Where a pod finds its inputs and puts its outputs: Dataset sources, base models and
output locations, mapped to volumes, mounts, fetch steps and paths inside the pod."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from kubetune_operator.api.common import ModelRef, ModelSource, S3Location, SecretRef
from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import OutputStorage
from kubetune_operator.resources.common import Manifest, container_security_context
from kubetune_trainer.contract.fetch import FetchSource, HttpFile, HubFile, S3Object

FETCHED_FILE = "data.jsonl"


@dataclass
class Mounted:
    """The volumes, mounts, init containers and environment a pod needs to see one input
    or output at `path`."""

    path: str
    image_root: str | None = None
    volumes: list[Manifest] = field(default_factory=list)
    mounts: list[Manifest] = field(default_factory=list)
    init_containers: list[Manifest] = field(default_factory=list)
    env: list[Manifest] = field(default_factory=list)

    def merge(self, other: Mounted) -> None:
        self.volumes += other.volumes
        self.mounts += other.mounts
        self.init_containers += other.init_containers
        self.env += other.env


def _secret_env(
    ref: SecretRef, keys: dict[str, str], optional: tuple[str, ...] = ()
) -> list[Manifest]:
    """Environment variables taken from a Secret: credentials never pass through the spec."""
    return [
        {
            "name": var,
            "valueFrom": {
                "secretKeyRef": {
                    "name": ref.name,
                    "key": key,
                    **({"optional": True} if var in optional else {}),
                }
            },
        }
        for var, key in keys.items()
    ]


def s3_env(s3: S3Location) -> list[Manifest]:
    env = _secret_env(
        s3.secret_ref,
        {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION": "AWS_REGION",
        },
        optional=("AWS_REGION",),
    )
    if s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint})
    return env


def _fetch_container(
    name: str, image: str, source: FetchSource, out: str, mount: Manifest, env: list[Manifest]
) -> Manifest:
    return {
        "name": name,
        "image": image,
        "command": ["kubetune", "fetch", "--source", source.to_json(), "--out", out],
        "env": [{"name": "HOME", "value": "/tmp"}, *env],
        "volumeMounts": [mount, {"name": "tmp", "mountPath": "/tmp"}],
        # `kubetune fetch` prints why it failed (no such key, access denied): that text
        # becomes the status message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }


def dataset_input(volume: str, spec: DatasetSpec, mount_path: str, image: str) -> Mounted:
    """Mount (or fetch) a Dataset's JSONL file read-only at `mount_path`."""
    src = spec.source
    if src.pvc is not None:
        path = posixpath.join(mount_path, src.pvc.path)
        root = posixpath.join(mount_path, spec.image_root) if spec.image_root is not None else None
        return Mounted(
            path=path,
            image_root=root,
            volumes=[
                {
                    "name": volume,
                    "persistentVolumeClaim": {"claimName": src.pvc.claim_name, "readOnly": True},
                }
            ],
            mounts=[{"name": volume, "mountPath": mount_path, "readOnly": True}],
        )
    if src.config_map is not None:
        cm = src.config_map
        return Mounted(
            path=posixpath.join(mount_path, cm.key),
            image_root=posixpath.join(mount_path, spec.image_root) if spec.image_root else None,
            volumes=[
                {
                    "name": volume,
                    "configMap": {"name": cm.name, "items": [{"key": cm.key, "path": cm.key}]},
                }
            ],
            mounts=[{"name": volume, "mountPath": mount_path, "readOnly": True}],
        )
    # Remote sources are fetched by the trainer image into an emptyDir first; images
    # they reference must then be URLs or embedded data: URIs.
    env: list[Manifest] = []
    source: FetchSource
    if src.s3 is not None:
        source = FetchSource(s3=S3Object(uri=src.s3.uri))
        env = s3_env(src.s3)
    elif src.http is not None:
        source = FetchSource(http=HttpFile(url=src.http.url))
    else:
        hf = src.hugging_face
        assert hf is not None  # the CRD admits exactly one source
        revision = {"revision": hf.revision} if hf.revision else {}
        source = FetchSource(hugging_face=HubFile(repo=hf.repo, file=hf.file, **revision))
        if hf.token_secret_ref is not None:
            env = _secret_env(hf.token_secret_ref, {"HF_TOKEN": "HF_TOKEN"})
    out = posixpath.join(mount_path, FETCHED_FILE)
    fetch_mount = {"name": volume, "mountPath": mount_path}
    return Mounted(
        path=out,
        volumes=[{"name": volume, "emptyDir": {}}],
        mounts=[{"name": volume, "mountPath": mount_path, "readOnly": True}],
        init_containers=[_fetch_container(f"fetch-{volume}", image, source, out, fetch_mount, env)],
    )


def base_model_input(model: ModelRef, mount_path: str, image: str) -> Mounted:
    """The base model as the trainer (or the server) loads it: a folder, or a hub id."""
    src = model.source
    if src is None or src.hugging_face is not None:
        env = []
        if (
            src is not None
            and src.hugging_face is not None
            and src.hugging_face.token_secret_ref is not None
        ):
            env = _secret_env(src.hugging_face.token_secret_ref, {"HF_TOKEN": "HF_TOKEN"})
        return Mounted(path=model.name, env=env)
    return model_folder_input("base-model", src, mount_path, image)


def model_folder_input(volume: str, src: ModelSource, mount_path: str, image: str) -> Mounted:
    """A model or adapter folder, read-only: mounted from its PVC, or fetched from S3 by
    the trainer image into an emptyDir first."""
    if src.pvc is not None:
        return Mounted(
            path=posixpath.join(mount_path, src.pvc.path),
            volumes=[
                {
                    "name": volume,
                    "persistentVolumeClaim": {"claimName": src.pvc.claim_name, "readOnly": True},
                }
            ],
            mounts=[{"name": volume, "mountPath": mount_path, "readOnly": True}],
        )
    assert src.s3 is not None  # the CRD admits exactly one source
    fetch_mount = {"name": volume, "mountPath": mount_path}
    return Mounted(
        path=mount_path,
        volumes=[{"name": volume, "emptyDir": {}}],
        mounts=[{"name": volume, "mountPath": mount_path, "readOnly": True}],
        init_containers=[
            _fetch_container(
                f"fetch-{volume}",
                image,
                FetchSource(s3=S3Object(uri=src.s3.uri)),
                mount_path,
                fetch_mount,
                s3_env(src.s3),
            )
        ],
    )


def output_location(storage: OutputStorage, mount_path: str) -> tuple[Mounted, str]:
    """The output folder and the URI reported in status. On a PVC checkpoints outlive
    the pod; with S3 the trainer keeps copies there (see finetunejob/training_job.plan)."""
    if storage.pvc is not None:
        pvc = storage.pvc
        mounted = Mounted(
            path=posixpath.join(mount_path, pvc.path),
            volumes=[{"name": "output", "persistentVolumeClaim": {"claimName": pvc.claim_name}}],
            mounts=[{"name": "output", "mountPath": mount_path}],
        )
        return mounted, f"pvc://{pvc.claim_name}/{pvc.path}".rstrip("/")
    assert storage.s3 is not None
    # The trainer uploads the exported model to S3 at the end (TrainingConfig.outputUri);
    # checkpoints are written to the pod's emptyDir and copied to S3 as they are written
    # (checkpointUri), which is where a replacement pod resumes from.
    mounted = Mounted(
        path=mount_path,
        volumes=[{"name": "output", "emptyDir": {}}],
        mounts=[{"name": "output", "mountPath": mount_path}],
        env=s3_env(storage.s3),
    )
    return mounted, storage.s3.uri
