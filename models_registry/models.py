"""Models of the models_registry app."""
