"""The worker's line per call of the handler left out (service/handlers/step_log.py), every other line kept."""
import logging

import pytest

from rnnserve.service.handlers import step_log


@pytest.fixture
def root_records():
    root = logging.getLogger()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, filters, level = Keep(), list(root.filters), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(handler)
    root.filters[:] = filters
    root.setLevel(level)


def test_the_step_line_is_left_out_and_every_other_line_kept(root_records):
    step_log.drop_step_lines()
    step_log.drop_step_lines()  # once per process, however often a handler sets up
    assert sum(isinstance(f, step_log._DropStepLines) for f in logging.getLogger().filters) == 1
    logging.info("Backend received inference at: %d", 1764500000)  # as TorchServe's worker logs it
    logging.info("model_name: %s, batchSize: %d", "lm", 64)
    logging.info("Backend received inference at: soon")  # another format: kept
    logging.getLogger("rnnserve.service.handlers.lm_handler").info("Backend received inference at: %d", 1)
    assert root_records == ["model_name: lm, batchSize: 64", "Backend received inference at: soon",
                            "Backend received inference at: 1"]
