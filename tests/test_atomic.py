import os

from pomq_deploy.atomic import NOTES_MARKER, write_generated


def test_regenerated_document_keeps_the_notes_below_the_marker(tmp_path):
    doc = tmp_path / "bench.md"
    write_generated(doc, "# Table\n\n| a |\n")
    assert doc.read_text() == f"# Table\n\n| a |\n\n{NOTES_MARKER}\n"
    doc.write_text(doc.read_text() + "## Earlier machine\n\n| old |\n")
    write_generated(doc, "# Table\n\n| b |")
    assert doc.read_text() == f"# Table\n\n| b |\n\n{NOTES_MARKER}\n## Earlier machine\n\n| old |\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]  # no temporary file left


def test_a_killed_builds_staging_folder_is_removed_by_the_next_build_into_the_same_place(tmp_path):
    """SIGKILL leaves ``.<plan-id>.<pid>-<random>.tmp`` behind (no except runs): the next build of that plan removes it
    and says so, while a staging folder of a process still running (a parallel build) stays."""
    import subprocess
    import sys

    from pomq_deploy.artifact import staging_dir

    final = tmp_path / "deit_fmnist" / "0123abcd4567"
    final.parent.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = final.parent / f".{final.name}.{int(gone.stdout)}-k1ll3d.tmp"
    live = final.parent / f".{final.name}.{os.getpid()}-busy.tmp"
    other = final.parent / f".abcdef012345.{int(gone.stdout)}-k1ll3d.tmp"  # another plan's: not this build's to judge
    for d in (dead, live, other):
        (d / "model.onnx").parent.mkdir()
        (d / "model.onnx").write_bytes(b"x" * 100)
    said = []
    with staging_dir(final, say=said.append) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not dead.exists() and live.exists() and other.exists() and (final / "manifest.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder's usual mode, not mkdtemp's 0700
    assert said == [f"removed 1 staging folder(s) of {final} left by killed builds: {dead.name}"]


def test_a_killed_searchs_work_folder_is_removed_by_the_next_one(tmp_path):
    """A search keeps its builds in <tmp>/pomq-search-<pid>-<random>; SIGKILL leaves it (12 MB and more per plan
    there): the next search removes those whose process is gone, and keeps a running search's."""
    import subprocess
    import sys

    from pomq_deploy.atomic import remove_dead_processes_folders
    from pomq_deploy.search.evaluator import WORK_PREFIX

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    dead, live = tmp_path / f"{WORK_PREFIX}{gone}-abc", tmp_path / f"{WORK_PREFIX}{os.getpid()}-def"
    unrelated = tmp_path / f"{WORK_PREFIX}notapid"
    for d in (dead, live, unrelated):
        d.mkdir()
    assert remove_dead_processes_folders(tmp_path, WORK_PREFIX) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name])


def test_an_output_must_resolve_under_its_folder(tmp_path):
    import pytest

    from pomq_deploy.atomic import inside
    from pomq_deploy.errors import PomqError

    assert inside(tmp_path, "deit", "ab12") == tmp_path / "deit" / "ab12"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    for names in (("..", "x"), ("a/../../x",), ("/etc",), (".",), ("link", "x")):
        with pytest.raises(PomqError, match="not under .*out; refusing to write there"):
            inside(tmp_path / "out", *names)


def test_a_failed_build_leaves_neither_its_staging_folder_nor_the_folders_made_for_it(tmp_path):
    import pytest

    from pomq_deploy.artifact import staging_dir

    (tmp_path / "engines").mkdir()
    with pytest.raises(OSError), staging_dir(tmp_path / "engines" / "deit" / "ab12") as tmp:
        (tmp / "model.onnx").write_bytes(b"x")
        raise OSError(28, "No space left on device")
    assert list((tmp_path / "engines").iterdir()) == []  # "deit", made for it, went with it; "engines" was there
