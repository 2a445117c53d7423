import pytest

from pipelines.io.storage import Storage


def test_write_then_read_bytes_round_trip_without_side_files(spark, tmp_path):
    storage = Storage(spark)
    path = str(tmp_path / "d" / "blob.bin")
    data = bytes(range(256)) * 40
    storage.write_bytes(path, data)
    assert storage.read_bytes(path) == data
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["blob.bin"]
    storage.write_text(path, "replaced")
    assert storage.read_bytes(path) == b"replaced"


def test_staged_dir_publishes_on_success_and_keeps_old_output_on_failure(spark, tmp_path):
    storage = Storage(spark)
    final = str(tmp_path / "out")
    with storage.staged_dir(final) as tmp:
        storage.write_text(f"{tmp}/a.txt", "first")
    assert storage.read_bytes(f"{final}/a.txt") == b"first"
    with pytest.raises(RuntimeError, match="boom"):
        with storage.staged_dir(final) as tmp:
            storage.write_text(f"{tmp}/a.txt", "second")
            raise RuntimeError("boom")
    assert storage.read_bytes(f"{final}/a.txt") == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_run_are_removed_before_the_next(spark, tmp_path):
    storage = Storage(spark)
    (tmp_path / "out._tmp-deadbeef").mkdir()
    (tmp_path / "out._old-cafe").mkdir()
    (tmp_path / "outside").mkdir()
    with storage.staged_dir(str(tmp_path / "out")) as tmp:
        storage.write_text(f"{tmp}/x", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "outside"]
    assert storage.list(str(tmp_path / "out")) == ["x"]


def test_refuse_existing_names_the_setting_and_path(spark, tmp_path):
    storage = Storage(spark)
    storage.refuse_existing(str(tmp_path / "absent"), "score")  # nothing there: no error
    (tmp_path / "scores").mkdir()
    with pytest.raises(FileExistsError, match="score.mode is 'error'. Received: score.output="):
        storage.refuse_existing(str(tmp_path / "scores"), "score")


def test_local_atomic_write_leaves_no_temporary_on_failure(tmp_path):
    from pipelines.io.task_files import is_temp_name, write_local_atomic

    target = tmp_path / "sub" / "file.bin"
    write_local_atomic(str(target), b"abc")
    assert target.read_bytes() == b"abc"
    with pytest.raises(TypeError):
        write_local_atomic(str(target), "not bytes")  # fails after the temporary was opened
    assert target.read_bytes() == b"abc"
    assert not [p.name for p in target.parent.iterdir() if is_temp_name(p.name)]
