"""rnnserve: serving recurrent sequence models (LSTM/GRU) through TorchServe behind a REST gateway."""

__version__ = "0.1.0"
