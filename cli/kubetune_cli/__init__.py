"""`kubectl kubetune`: the self-service client for kubetune clusters.

A kubectl plugin (kubectl finds the `kubectl-kubetune` console script on PATH) that
takes an ML engineer from a JSONL file on a laptop to chatting with the tuned model.
It talks only to the Kubernetes API (the service proxy for chat) and to the stores
the platform's defaults name.
"""
