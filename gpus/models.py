"""Models of the gpus app."""
