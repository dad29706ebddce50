"""Optional framework integrations, imported only when used: ``lightning`` (a PyTorch
Lightning callback) and ``transformers`` (a Hugging Face ``TrainerCallback``)."""
