"""adalora_hf: the PEFT-compatible AdaLoraConfig / AdaLoraModel bridge for transformers."""
