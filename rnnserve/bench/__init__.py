"""The measuring tools: `rnnserve bench`, `rnnserve loadtest` and `rnnserve soak`.

    baselines.py  raw engine vs naive handlers vs full stack (bench lm|translation|engine|cpu)
    serving.py    the serving path alone, on a synthetic model whose engine costs nothing (bench serving)
    sessions.py   continuing a conversation from its state vs re-sending its history (bench sessions)
    loadtest.py   locust, headless, against a running stack
    soak.py       memory and latency over minutes of load
"""
