"""Records, the two tasks and their wording, the challenge layout, validation, images and augmentation."""
