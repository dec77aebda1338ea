"""minqlora: QLoRA rebuilt from scratch."""
