"""The readers of a user's training data: every problem stops before training, naming file and line."""
import gzip

import pytest

from rnnserve.cli import main
from rnnserve.training.corpus import DataError, hold_out, read_lines, read_parallel, read_text, read_tsv


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_parallel_files_are_read_and_their_lengths_must_agree(tmp_path):
    src = write(tmp_path / "a.de", "Ein Hund.\nZwei Katzen.\n")
    tgt = write(tmp_path / "a.en", "A dog.\nTwo cats.\n")
    data = read_parallel(src, tgt)
    assert (data.src, data.tgt, data.dropped) == (["Ein Hund.", "Zwei Katzen."], ["A dog.", "Two cats."], 0)
    short = write(tmp_path / "b.en", "A dog.\n")
    with pytest.raises(DataError) as e:
        read_parallel(src, short)
    assert str(e.value) == (f"{src}:2: line-aligned files differ in length: {src} has 2 lines, {short} has 1")


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    bad = write(tmp_path / "bad.txt", "fine\nalso fine\ncaf\xe9 latin-1\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{bad}:3: not UTF-8 \(invalid continuation byte at byte 3\)$"):
        read_lines(bad)
    with pytest.raises(DataError, match="no such file"):
        read_lines(tmp_path / "missing.txt")


def test_gzip_and_a_byte_order_mark_are_handled(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write("\ufeffÜber\nStraße\n".encode("utf-8"))
    assert read_lines(path) == ["Über", "Straße"]


def test_tsv_columns_and_a_missing_column(tmp_path):
    tsv = write(tmp_path / "p.tsv", "id1\tBonjour.\tHello.\nid2\tMerci.\tThanks.\n\nid3\tSeul\n")
    with pytest.raises(DataError, match=rf"^{tsv}:4: no column 2 \(the line has 2 columns, numbered from 0\)$"):
        read_tsv(tsv, 1, 2)
    good = write(tmp_path / "q.tsv", "id1\tBonjour.\tHello.\nid2\tMerci.\tThanks.\n")
    data = read_tsv(good, src_column=2, tgt_column=1)
    assert data.src == ["Hello.", "Thanks."] and data.tgt == ["Bonjour.", "Merci."]


def test_long_and_empty_pairs_are_dropped_and_counted_and_nothing_left_is_an_error(tmp_path):
    src = write(tmp_path / "s", "short\n" + "x" * 50 + "\n\nok\n")
    tgt = write(tmp_path / "t", "kurz\ny\nleer\nok\n")
    data = read_parallel(src, tgt, max_chars=20)
    assert data.src == ["short", "ok"] and data.dropped == 2
    with pytest.raises(DataError, match=rf"^{src} \+ {tgt}: no sentence pairs to train on: of its 4 lines, 4 with an "
                                        r"empty side or a side longer than 1 characters$"):
        read_parallel(src, tgt, max_chars=1)
    blank = write(tmp_path / "blank.tsv", "  \n\t\n\n")
    with pytest.raises(DataError, match=rf"^{blank}: no sentence pairs to train on: of its 3 lines, 3 blank$"):
        read_tsv(blank)
    empty = write(tmp_path / "e", "")
    with pytest.raises(DataError, match=rf"^{empty} \+ {empty}: no sentence pairs to train on: no lines at all$"):
        read_parallel(empty, empty)
    with pytest.raises(DataError, match="no text to train on"):
        read_text(write(tmp_path / "empty", "\n \n"))


def test_the_held_out_share_is_fixed_by_the_seed(tmp_path):
    src = write(tmp_path / "s", "".join(f"s{i}\n" for i in range(100)))
    tgt = write(tmp_path / "t", "".join(f"t{i}\n" for i in range(100)))
    data = read_parallel(src, tgt)
    train, valid = hold_out(data, 0.1, seed=7)
    again = hold_out(data, 0.1, seed=7)[1]
    assert len(valid) == 10 and len(train) == 90 and valid.src == again.src
    assert not set(valid.src) & set(train.src)
    assert [s[1:] for s in valid.src] == [t[1:] for t in valid.tgt]  # pairs stay pairs


def test_the_cli_stops_before_training_with_the_file_and_line(tmp_path, capsys):
    src = write(tmp_path / "s.fr", "Un.\nDeux.\nTrois.\n")
    tgt = write(tmp_path / "t.en", "One.\nTwo.\n")
    code = main(["train", "translation", "--train-src", str(src), "--train-tgt", str(tgt), "--out",
                 str(tmp_path / "m")])
    assert code == 2
    err = capsys.readouterr().err
    assert err == (f"rnnserve train: error: {src}:3: line-aligned files differ in length: {src} has 3 lines, "
                   f"{tgt} has 2\n")
    assert not (tmp_path / "m").exists()
    assert main(["train", "lm", "--out", str(tmp_path / "l")]) == 2
    assert capsys.readouterr().err == "rnnserve train: error: give --train-file, the text to train on\n"
