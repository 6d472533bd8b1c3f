"""Offline translation from the command line: progress on stderr never shares a line with the output."""
import io

import pytest

from rnnserve.offline import CLEAR_LINE, translate_lines


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_clears_its_line_before_any_translation_is_written(tiny_translation_folder, monkeypatch):
    import rnnserve.offline as offline

    clock = iter(range(0, 10_000, 2))  # every report is a second or more after the last: each one shows
    monkeypatch.setattr(offline.time, "monotonic", lambda: float(next(clock)))
    screen = Terminal()  # stdout and stderr on one terminal: the order of writes is what the user sees
    n = translate_lines(tiny_translation_folder, ["Ein Hund.", "", "Zwei Katzen."], screen, beam_size=1,
                        max_tokens=3, progress=screen)
    assert n == 3
    written = screen.getvalue()
    assert written.startswith(CLEAR_LINE + "translated ")
    # every progress line is erased before the translations, and the summary comes after them on a line of its own
    progress_end = written.rindex("lines/s", 0, written.index("\n"))
    assert written[progress_end + len("lines/s"):].startswith(CLEAR_LINE)
    out_lines = written[written.index(CLEAR_LINE, progress_end) + len(CLEAR_LINE):].split("\n")
    assert out_lines[1] == "" and "translated" not in "".join(out_lines[:3])
    assert out_lines[3].startswith(CLEAR_LINE + "translated 3 lines in ") and out_lines[4] == ""


def test_no_live_progress_when_stderr_is_not_a_terminal(tiny_translation_folder):
    out, err = io.StringIO(), io.StringIO()
    translate_lines(tiny_translation_folder, ["Ein Hund.", "Zwei Katzen."], out, beam_size=1, max_tokens=3,
                    progress=err)
    assert len(out.getvalue().splitlines()) == 2
    assert "\r" not in err.getvalue() and err.getvalue().startswith("translated 2 lines in ")
    assert err.getvalue().count("\n") == 1


def test_evaluate_shows_progress_on_a_terminal_and_erases_it_before_the_result(tiny_translation_folder, tmp_path,
                                                                               monkeypatch):
    import rnnserve.offline as offline
    from rnnserve.training.evaluate import evaluate_translation

    clock = iter(range(0, 10_000, 2))
    monkeypatch.setattr(offline.time, "monotonic", lambda: float(next(clock)))
    (tmp_path / "src").write_text("Ein Hund.\nZwei Katzen.\n")
    (tmp_path / "ref").write_text("A dog.\nTwo cats.\n")
    screen = Terminal()
    result = evaluate_translation(tiny_translation_folder, tmp_path / "src", tmp_path / "ref", 1, 0.6, progress=screen)
    assert result["sentences"] == 2
    written = screen.getvalue()
    assert written.startswith(CLEAR_LINE + "translated ") and "/2 lines, " in written and written.endswith(CLEAR_LINE)
    off = io.StringIO()  # not a terminal: nothing
    evaluate_translation(tiny_translation_folder, tmp_path / "src", tmp_path / "ref", 1, 0.6, progress=off)
    assert off.getvalue() == ""


def test_a_model_is_found_by_its_folder_or_by_the_name_it_is_served_under(tiny_lm_folder, tmp_path, monkeypatch):
    from rnnserve.models.folder import copy_model_folder
    from rnnserve.offline import resolve_model

    folder = copy_model_folder(tiny_lm_folder, tmp_path / "models" / "foo", name="bar")  # --name bar --out .../foo
    monkeypatch.setenv("RNNSERVE_MODELS_DIR", str(tmp_path / "models"))
    assert resolve_model("foo") == folder and resolve_model("bar") == folder and resolve_model(str(folder)) == folder
    with pytest.raises(SystemExit, match="no model folder 'baz'"):
        resolve_model("baz")
