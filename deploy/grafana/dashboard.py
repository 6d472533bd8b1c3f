"""Writes deploy/grafana/dashboards/rnnserve.json (provisioned into Grafana by docker-compose).

    python deploy/grafana/dashboard.py

Every query names only metrics the running stack exports (tests/e2e/test_observability.py checks).
"""
import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "rnnserve.json"
DS = {"type": "prometheus", "uid": "prometheus"}
ERRORS = "validation|overloaded|timeout|cancelled|upstream|internal"


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, model) (rate({metric}_bucket[1m])))",
             f"p{int(q * 100)} {{{{model}}}}")
            for q in (0.5, 0.9, 0.99)]


PANELS = [
    ("Output tokens/s", "short", [("sum by (model) (rate(rnnserve_generation_tokens_total[1m]))", "{{model}}")]),
    ("Requests/s by outcome", "reqps", [("sum by (model, outcome) (rate(rnnserve_requests_total[1m]))",
                                         "{{model}} {{outcome}}")]),
    ("Time to first token", "s", quantiles("rnnserve_time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("rnnserve_inter_token_latency_seconds")),
    ("End-to-end latency", "s", quantiles("rnnserve_e2e_request_latency_seconds")),
    ("Queue time (admission)", "s", quantiles("rnnserve_queue_time_seconds")),
    ("Running / waiting requests", "short", [("sum by (model) (rnnserve_requests_running)", "running {{model}}"),
                                             ("sum by (model) (rnnserve_requests_waiting)", "waiting {{model}}")]),
    ("Batch size (sequences per step)", "short", [
        ("sum by (model) (rate(rnnserve_batch_size_sum[1m])) / sum by (model) (rate(rnnserve_batch_size_count[1m]))",
         "mean {{model}}"),
        ("histogram_quantile(0.9, sum by (le, model) (rate(rnnserve_batch_size_bucket[1m])))", "p90 {{model}}")]),
    ("Errors by reason", "reqps", [(f'sum by (model, outcome) '
                                     f'(rate(rnnserve_requests_total{{outcome=~"{ERRORS}"}}[5m]))',
                                    "{{model}} {{outcome}}"),
                                   ("sum by (model) (rate(rnnserve_client_disconnects_total[5m]))",
                                    "{{model}} client disconnects")]),
    ("Tokens per request", "short", [
        ("histogram_quantile(0.5, sum by (le, model) (rate(rnnserve_request_generation_tokens_bucket[5m])))",
         "generated p50 {{model}}"),
        ("histogram_quantile(0.5, sum by (le, model) (rate(rnnserve_request_prompt_tokens_bucket[5m])))",
         "prompt p50 {{model}}")]),
    ("Sessions held", "short", [("sum by (model) (rnnserve_sessions)", "sessions {{model}}"),
                                ("sum by (model, reason) (rate(rnnserve_session_evictions_total[5m])) * 60",
                                 "evictions/min {{model}} {{reason}}")]),
    ("Session memory", "bytes", [("sum by (model) (rnnserve_session_bytes)", "{{model}}")]),
    ("TorchServe requests/s and mean latency", "short", [
        ("sum by (model_name) (rate(ts_inference_requests_total[1m]))", "requests/s {{model_name}}"),
        ("sum by (model_name) (rate(ts_inference_latency_microseconds[1m])) / 1e6 / "
         "clamp_min(sum by (model_name) (rate(ts_inference_requests_total[1m])), 1e-9)", "mean s {{model_name}}")]),
    ("TorchServe host: CPU and memory", "percent", [("CPUUtilization", "CPU %"), ("MemoryUtilization", "memory %")]),
    ("TorchServe GPUs (GPU hosts only)", "percent", [("GPUUtilization", "GPU {{DeviceId}}"),
                                                    ("GPUMemoryUtilization", "GPU memory {{DeviceId}}")]),
    ("TorchServe worker: step times", "ms", [("PredictionTime", "predict {{ModelName}}"),
                                             ("WorkerThreadTime", "frontend worker thread")]),
]


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": chr(65 + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict:
    return {
        "uid": "rnnserve", "title": "rnnserve", "schemaVersion": 39, "version": 1, "editable": False,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "tags": ["rnnserve"],
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
