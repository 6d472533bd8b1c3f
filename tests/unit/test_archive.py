"""The archives' model-config.yaml: what `rnnserve archive` writes into each .mar, for the CPU and GPU profiles."""
import json
import zipfile

import pytest
import yaml

from rnnserve.cli import main
from rnnserve.models.folder import copy_model_folder
from rnnserve.service.archive import GPU_SETTINGS, MODEL_CONFIGS, build_archives, model_config


def _written(store, name) -> dict:
    with zipfile.ZipFile(store / f"{name}.mar") as z:
        return yaml.safe_load(z.read("model-config.yaml"))


@pytest.fixture
def models(tmp_path, tiny_lm_folder, tiny_translation_folder):
    copy_model_folder(tiny_lm_folder, tmp_path / "models" / "lm")
    copy_model_folder(tiny_translation_folder, tmp_path / "models" / "tr")
    return tmp_path / "models"


def test_the_gpu_profile_is_what_archive_gpu_writes(models, tmp_path, monkeypatch):
    monkeypatch.delenv("RNNSERVE_ARCHIVE_PROFILE", raising=False)
    store = tmp_path / "store"
    assert main(["archive", "--gpu", "--models-dir", str(models), "--model-store", str(store)]) == 0
    lm, tr = _written(store, "lm"), _written(store, "tr")
    for name, task, written in (("lm", "lm", lm), ("tr", "translation", tr)):
        config = json.loads((models / name / "config.json").read_text())
        assert written == model_config(task, config, "gpu")
    assert lm["batchSize"] == 1024 and lm["continuousBatching"] is True
    assert {k: lm["handler"][k] for k in ("max_batch_size", "cuda_graphs", "half_precision")} == {
        "max_batch_size": 1024, "cuda_graphs": True, "half_precision": True}
    assert tr["handler"]["max_rows"] == 1024 and tr["handler"]["half_precision"] is True
    assert tr["handler"]["step_on_admit"] is False  # the CPU table's other settings stay
    # everything else is the CPU table's
    cpu = model_config("lm", json.loads((models / "lm" / "config.json").read_text()))
    def rest(handler):
        return {k: v for k, v in handler.items() if k not in GPU_SETTINGS["lm"]["handler"]}

    assert rest(lm["handler"]) == rest(cpu["handler"]) and len(rest(cpu["handler"])) > 5


def test_the_profile_comes_from_the_environment_and_defaults_to_cpu(models, tmp_path, monkeypatch):
    monkeypatch.setenv("RNNSERVE_ARCHIVE_PROFILE", "gpu")
    build_archives(models, tmp_path / "gpu")
    assert _written(tmp_path / "gpu", "lm")["handler"]["cuda_graphs"] is True
    monkeypatch.delenv("RNNSERVE_ARCHIVE_PROFILE")
    build_archives(models, tmp_path / "cpu")
    lm = _written(tmp_path / "cpu", "lm")
    assert lm["batchSize"] == MODEL_CONFIGS["lm"]["batchSize"] == 64 and "cuda_graphs" not in lm["handler"]
    assert _written(tmp_path / "cpu", "tr")["handler"]["max_rows"] == 256
    monkeypatch.setenv("RNNSERVE_ARCHIVE_PROFILE", "tpu")
    with pytest.raises(ValueError, match="archive profile must be one of"):
        build_archives(models, tmp_path / "x")


def test_the_gpu_profile_does_not_change_the_table():
    model_config("lm", {"task": "lm"}, "gpu")
    assert MODEL_CONFIGS["lm"]["batchSize"] == 64 and MODEL_CONFIGS["lm"]["handler"]["max_batch_size"] == 64
    assert "cuda_graphs" not in MODEL_CONFIGS["lm"]["handler"]


def test_archives_of_one_name_built_at_once_keep_their_own_files(tmp_path, tiny_lm_folder):
    """torch-model-archiver stages in $TMPDIR/<name>: concurrent builds of one name (two stacks, test sessions
    or worktrees on a machine) must not share it."""
    from concurrent.futures import ThreadPoolExecutor

    from rnnserve.service.archive import build_archive

    folders = [copy_model_folder(tiny_lm_folder, tmp_path / f"m{i}" / "lm", limits={"max_tokens": 10 + i})
               for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda i: build_archive("lm", folders[i], "lm", tmp_path / f"store{i}"), range(4)))
    for i, path in enumerate(paths):
        with zipfile.ZipFile(path) as z:
            assert json.loads(z.read("config.json"))["limits"] == {"max_tokens": 10 + i}


def test_served_names_come_from_config_and_must_be_unique_and_valid(tmp_path, tiny_lm_folder):
    from rnnserve.service.archive import model_folders, served_folders

    models = tmp_path / "models"
    copy_model_folder(tiny_lm_folder, models / "foo", name="bar")
    copy_model_folder(tiny_lm_folder, models / "baz")
    assert [(n, f.name) for n, f, _ in model_folders(models)] == [("baz", "baz"), ("bar", "foo")]
    assert served_folders(models, ["bar"]) == {"bar": models / "foo"}
    with pytest.raises(SystemExit, match=r"is served as \['foo'\] \(there are \['bar', 'baz'\]\)"):
        served_folders(models, ["foo"])
    copy_model_folder(tiny_lm_folder, models / "qux", name="bar")
    with pytest.raises(SystemExit, match=f"^{models / 'foo'} and {models / 'qux'} are both served as 'bar'"):
        model_folders(models)
    (models / "qux" / "config.json").write_text(json.dumps({**json.loads((models / "qux" / "config.json").read_text()),
                                                            "name": "no spaces"}))
    with pytest.raises(SystemExit, match="the served name 'no spaces' must be letters, digits"):
        model_folders(models)


def test_int8_follows_the_models_check_on_cpu_and_stays_off_in_the_gpu_profile():
    assert model_config("lm", {"task": "lm", "int8": True})["handler"]["int8"] is True
    assert model_config("lm", {"task": "lm", "int8": False})["handler"]["int8"] is False
    assert model_config("lm", {"task": "lm", "int8": True}, "gpu")["handler"]["int8"] is False
    tr = {"task": "translation", "model": {}}
    assert model_config("translation", {**tr, "int8": True})["handler"]["int8"] is True
    assert model_config("translation", tr)["handler"]["int8"] is False
    assert model_config("translation", {**tr, "int8": True}, "gpu")["handler"]["int8"] is False
