"""Training of the served recurrent models (installed as `rnnserve.training`)."""
