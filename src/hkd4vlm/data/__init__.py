"""Records, the challenge layout, validation, the synthetic benchmark and augmentation."""
