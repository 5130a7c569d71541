"""Loading VLMs (Auto classes, LoRA), the registry of tiny presets and their families, the zoo, prompts and answer scoring."""
