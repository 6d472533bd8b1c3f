"""Gateway and TorchServe handlers (installed as `rnnserve.service`)."""
