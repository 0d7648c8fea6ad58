"""eval/report.py: every cell shows n and its 95% Wilson interval; records with and without a prompt hash or a
timing label are read alike, and the timing labels are printed with the table."""
from eval import report


def rec(score, seconds=10.0, **extra):
    return {"task": "passkey", "setting": "pc2k", "target_length": 16384, "score": score, "seconds": seconds,
            **extra}


def test_cell_has_n_and_the_wilson_interval():
    # 8 of 10: Wilson 95% = 49.0%-94.3%
    assert report.cell([rec(1.0)] * 8 + [rec(0.0)] * 2) == "80% (n=10; 49-94%) 10 s"
    assert report.cell([rec(1.0, 20.0)] * 3) == "100% (n=3; 44-100%) 20 s"


def test_table_reads_old_and_new_records_and_names_the_timing():
    rows = [rec(1.0), rec(0.0, prompt_sha256="ab" * 32, timing="shared CPU")]
    out = report.table(rows)
    assert "| passkey | pc2k | 50% (n=2; 9-91%) 10 s |" in out
    assert "pc2k: not labelled, shared CPU" in out


def test_session_cells_add_the_encoding_per_document():
    rows = [rec(1.0, 5.0, session=True, encode_s=90.0, i=0, depth=0.0)] * 4 + \
        [rec(0.0, 7.0, session=True, encode_s=110.0, i=1, depth=1.0)] * 4
    assert report.cell(rows) == ("50% (n=8; 22-78%) [documents all right: 1/2; 9-91%] 6 s a question + 100 s a "
                                 "document")
    rows[1] = {**rows[1], "score": 0.0}  # one miss in the first document: no document is all right
    assert report.cell(rows).startswith("38% (n=8; 14-69%) [documents all right: 0/2; 0-66%]")


def test_quiet_records_give_the_seconds_and_the_sample_is_checked():
    rows = [rec(1.0, 100.0, i=i, depth=i / 3, timing="shared CPU", pred="7", prompt_sha256="a") for i in range(4)]
    sample = [{**rows[1], "seconds": 60.0, "timing": "quiet"}, {**rows[3], "seconds": 64.0, "timing": "quiet"}]
    out = report.table(rows, sample=sample)
    assert "| passkey | pc2k | 100% (n=4; 51-100%) 62 s (quiet, n=2) |" in out and "pc2k: quiet" in out
    assert report.table(rows).count("100 s |") == 1  # without the sample: every record's seconds, no "quiet"
    rows[1] = {**rows[1], "seconds": 50.0, "timing": "quiet"}  # a quiet result and its rerun: one example, once
    assert "| 100% (n=4; 51-100%) 57 s (quiet, n=2) |" in report.table(rows, sample=sample)
    assert report.check_sample(rows, sample) == ("Timing sample: 2 reruns, every one with its result's prompt "
                                                 "and prediction")
    other = {**sample[0], "pred": "8"}
    assert "another prompt or prediction than the result's: [('pc2k', 'passkey', 16384, 1, " in \
        report.check_sample(rows, [other])
    assert "not in the results" in report.check_sample(rows, [{**sample[0], "i": 9}])
