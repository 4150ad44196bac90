from pomq_deploy.atomic import NOTES_MARKER, write_generated


def test_regenerated_document_keeps_the_notes_below_the_marker(tmp_path):
    doc = tmp_path / "bench.md"
    write_generated(doc, "# Table\n\n| a |\n")
    assert doc.read_text() == f"# Table\n\n| a |\n\n{NOTES_MARKER}\n"
    doc.write_text(doc.read_text() + "## Earlier machine\n\n| old |\n")
    write_generated(doc, "# Table\n\n| b |")
    assert doc.read_text() == f"# Table\n\n| b |\n\n{NOTES_MARKER}\n## Earlier machine\n\n| old |\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]  # no temporary file left
