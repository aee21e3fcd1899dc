"""Line breaks of text inputs (.txt, JSON lines): a file whose lines end in a lone CR is refused, not read as one
row (found by the mutation review of audit.sources, session 50)."""
import gzip

import pytest

from audit.config import RunConfig
from audit.errors import SourceError
from audit.pipeline import build_plan

MESSAGE = ("its lines end in a lone carriage return (CR, as classic Mac OS wrote text), not LF or CRLF, so it would be "
           "read as one line: convert it, e.g. tr '\\r' '\\n' < IN > OUT")


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.txt.gz", "prompts.jsonl"])
def test_a_file_of_lone_cr_line_breaks_is_refused(tmp_path, name):
    """Three prompts separated by CR alone were planned as one row holding all three (the run scored one
    'prompt' with two CRs in it and exited 0); JSON lines alike were one invalid_json row. Now the file is refused
    naming the line breaks, and --skip-bad-files skips it."""
    text = ("a red cat\rthe blue sofa\ra city at night\r" if ".txt" in name else
            '{"prompt": "a red cat"}\r{"prompt": "the blue sofa"}\r')
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    fmt = "txt" if ".txt" in name else "jsonl"
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(path),)))
    assert str(err.value) == (f"{path}: cannot read as {fmt} (ValueError: {MESSAGE}) (--skip-bad-files skips such "
                              "files and goes on)")
    plan = build_plan(RunConfig(inputs=(str(path),), skip_bad_files=True))
    assert plan.units == [] and [s["path"] for s in plan.skipped] == [str(path)]


@pytest.mark.parametrize("text, rows", [("a red cat\r\nthe blue sofa\r\n", 2),  # CRLF: read as before
                                        ("a red cat\r", 1),  # one line ending in CR
                                        ("a red cat\nthe blue\rsofa\n", 2),  # a CR inside a line of an LF file
                                        ("a red cat", 1)])
def test_lf_crlf_and_a_single_cr_terminated_line_are_read(tmp_path, text, rows):
    """Only a file with no LF in its first chunk and a CR followed by more text is refused."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(text.encode())
    assert build_plan(RunConfig(inputs=(str(path),))).file_rows == {str(path): rows}
