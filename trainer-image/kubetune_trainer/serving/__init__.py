"""What the trainer image gives vLLM's server pods: the guard in front of the server,
which an init container copies into the pod (``kubetune install-guard``)."""
