"""Training: SFT, DPO and preserve-skills SFT of VLMs and LLMs with TRL and PEFT.

- ``commands``: ``kubetune train`` and ``kubetune evaluate``; the only module the CLI
  imports at start-up, and it imports torch lazily.
- ``runner``: one run of any method end to end; ``sft`` and ``preference`` (DPO): each
  method's ``build_trainer``, imported only for a run of that method; ``preserve``: the
  preserve-general-skills loss that ``sft`` mixes into its trainer.
- ``config_mapping``: TrainingConfig -> TRL/PEFT/transformers settings (pure).
- ``records``, ``collate``, ``images``: examples -> chat records (typed dicts, with the
  preference record extending the chat record) -> model inputs with assistant-only
  labels; images fitted to maxPixels.
- ``models``: the base model with its processor or tokenizer.
- ``callbacks``, ``metrics``, ``report``, ``checkpoints``: the schedule, log lines,
  Prometheus gauges, report.json/loss.png/termination message, and resumable checkpoints.
- ``evaluate``: exact-match accuracy and reference loss of a model (and its base).
- ``inputs``: what the runner hands a method's builder.
"""
