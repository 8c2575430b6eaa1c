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
FETCHED_IMAGES = "images"


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
    """The keys from the location's Secret; without one, boto3 finds the pod's own
    identity (a web identity token, a metadata server) by itself."""
    env: list[Manifest] = []
    if s3.secret_ref is not None:
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
    return _kubetune_step(
        name, image, ["fetch", "--source", source.to_json(), "--out", out], [mount], env
    )


def _kubetune_step(
    name: str, image: str, args: list[str], mounts: list[Manifest], env: list[Manifest]
) -> Manifest:
    """An init container running `kubetune` from the trainer image."""
    return {
        "name": name,
        "image": image,
        "command": ["kubetune", *args],
        "env": [{"name": "HOME", "value": "/tmp"}, *env],
        "volumeMounts": [*mounts, {"name": "tmp", "mountPath": "/tmp"}],
        # `kubetune fetch` prints why it failed (no such key, access denied): that text
        # becomes the status message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }


REMOTE_IMAGES = "/data/remote-images"
"""Where a run's pods find its Datasets' http(s) images, fetched before it starts."""
_REMOTE_VOLUME = "remote-images"


def dataset_input(
    volume: str,
    spec: DatasetSpec,
    mount_path: str,
    image: str,
    remote_images_sha256: str | None = None,
) -> Mounted:
    """Mount (or fetch) a Dataset's JSONL file read-only at `mount_path`. A file on S3,
    http(s) or the hub is fetched into an emptyDir, and the images its lines name by
    relative path are fetched from beside it (or from its imageRoot there) into
    `images/`, its image root in the pod. With ``remote_images_sha256`` (for a run on a
    Dataset whose lines name http(s) images: the digest its validation recorded),
    those are fetched to REMOTE_IMAGES too; the pod mounts that folder once
    (``remote_images_input``)."""
    mounted, source, env = _dataset_file(volume, spec, mount_path, image)
    args = [
        "--data",
        mounted.path,
        "--limits",
        spec.limits.model_dump_json(by_alias=True),
        "--task",
        spec.task,
        "--format",
        spec.format,
    ]
    mounts: list[Manifest] = []
    if source is not None:
        images = posixpath.join(mount_path, FETCHED_IMAGES)
        args += ["--source", source.to_json(), "--images-out", images]
        if spec.image_root is not None:
            args += ["--image-root", spec.image_root]
        mounts.append({"name": volume, "mountPath": mount_path})
        mounted.image_root = images
    else:
        mounts += mounted.mounts
    if remote_images_sha256 is not None:
        args += ["--remote-out", REMOTE_IMAGES, "--remote-sha256", remote_images_sha256]
        mounts.append({"name": _REMOTE_VOLUME, "mountPath": REMOTE_IMAGES})
    if source is not None or remote_images_sha256 is not None:
        mounted.init_containers.append(
            _kubetune_step(f"images-{volume}", image, ["fetch-images", *args], mounts, env)
        )
    return mounted


def remote_images_input() -> Mounted:
    """The folder of a run's fetched http(s) images, read-only in its main container."""
    return Mounted(
        path=REMOTE_IMAGES,
        volumes=[{"name": _REMOTE_VOLUME, "emptyDir": {}}],
        mounts=[{"name": _REMOTE_VOLUME, "mountPath": REMOTE_IMAGES, "readOnly": True}],
    )


def _dataset_file(
    volume: str, spec: DatasetSpec, mount_path: str, image: str
) -> tuple[Mounted, FetchSource | None, list[Manifest]]:
    """The JSONL file mounted or fetched; for a fetched one, its source and the
    credentials' environment."""
    src = spec.source
    if src.pvc is not None:
        path = posixpath.join(mount_path, src.pvc.path)
        root = posixpath.join(mount_path, spec.image_root) if spec.image_root is not None else None
        mounted = Mounted(
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
        return mounted, None, []
    if src.config_map is not None:
        cm = src.config_map
        mounted = Mounted(
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
        return mounted, None, []
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
    mounted = Mounted(
        path=out,
        volumes=[{"name": volume, "emptyDir": {}}],
        mounts=[{"name": volume, "mountPath": mount_path, "readOnly": True}],
        init_containers=[_fetch_container(f"fetch-{volume}", image, source, out, fetch_mount, env)],
    )
    return mounted, source, env


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
