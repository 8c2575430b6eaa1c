"""kopf handlers. Importing this package registers them."""

from kubetune_operator.handlers import datasets, finetunejobs, modeldeployments, startup

__all__ = ["datasets", "finetunejobs", "modeldeployments", "startup"]
