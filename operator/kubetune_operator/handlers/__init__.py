"""kopf handlers. Importing this package registers them."""

from kubetune_operator.handlers import datasets, finetunejobs, startup

__all__ = ["datasets", "finetunejobs", "startup"]
