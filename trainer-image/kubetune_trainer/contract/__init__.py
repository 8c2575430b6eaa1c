"""The contract between ``kubetune_operator`` and ``kubetune_trainer``, typed once and
imported by both sides. It imports no torch, so the operator can use it.

- ``job``: ``TrainingConfig`` (job.json), its parts the FineTuneJob embeds, exit codes;
- ``rules``: rules across its fields, as CEL for the CRD and as Python;
- ``summaries``: what a finished container leaves in its termination message;
- ``metrics``: the trainer's gauges and their port;
- ``fetch``: the source ``kubetune fetch`` copies into the pod;
- ``base``: camelCase models and the s3:// URI form.
"""
