"""``kubetune fetch --source JSON``: what an init container copies into the pod, for
the sources that no volume can mount. The operator writes a ``FetchSource``, the
trainer image reads it."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from kubetune_trainer.contract.base import CamelModel, S3Uri

DEFAULT_REVISION = "main"
TRUSTED_HOSTS_VARIABLE = "KUBETUNE_TRUSTED_HOSTS"
"""Comma-separated ``host:port`` pairs that the one fetcher (``data/remote.py``) may
reach whatever their addresses: the platform's own image or dataset servers on private
networks. The operator sets it in every pod it makes from the chart's
``defaults.trustedHosts``; a spec cannot. Every other rule stays: http(s) only, the
deadline, the size cap, the checks at each redirect."""


class HttpFile(CamelModel):
    url: str = Field(min_length=1)


class S3Object(CamelModel):
    """An object, or with a trailing '/' every object under the prefix (a folder)."""

    uri: S3Uri


class HubFile(CamelModel):
    """A file in a dataset repository of a model hub."""

    repo: str = Field(min_length=1)
    file: str = Field(min_length=1)
    revision: str = DEFAULT_REVISION


class FetchSource(CamelModel):
    """Exactly one source."""

    http: HttpFile | None = None
    s3: S3Object | None = None
    hugging_face: HubFile | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if sum(x is not None for x in (self.http, self.s3, self.hugging_face)) != 1:
            raise ValueError("a source needs exactly one of http, s3 or huggingFace")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)
