"""Loading VLMs (Auto classes, LoRA), tiny presets, prompts and answer scoring."""
