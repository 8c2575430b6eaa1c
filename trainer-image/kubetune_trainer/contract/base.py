"""What every contract type shares: camelCase JSON, and the form of an s3:// URI."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints
from pydantic.alias_generators import to_camel

# s3://bucket/key: a DNS-style bucket name (3-63 characters), then any key or prefix.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
S3Uri = Annotated[str, StringConstraints(max_length=2048, pattern=S3_URI_PATTERN)]


class CamelModel(BaseModel):
    """Base for every contract type: camelCase in JSON/YAML, unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )
