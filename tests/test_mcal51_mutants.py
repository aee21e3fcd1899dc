"""Mutation review of calibrate.py and gates.py (session 51): tests that pin what the others left open."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import CalibrationError, reference_risks


def test_reference_risks_keep_the_first_row_of_each_prompt_hash_in_file_order(tmp_path):
    # a prompt on 3 rows is one reference prompt; its first row's risk stands for it (documented: "first row per
    # prompt_hash"), and the order is the file's, not sorted by hash or risk
    pq.write_table(pa.table({"prompt_hash": ["h2", "h1", "h2", "h3", "h1"], "risk": [0.5, 0.9, 0.7, 0.1, 0.2]}),
                   tmp_path / "risk.parquet")
    risks = reference_risks(tmp_path)
    assert risks.dtype == np.float64 and risks.tolist() == [0.5, 0.9, 0.1]


def test_reference_risks_of_a_folder_without_a_risk_table_name_it(tmp_path):
    with pytest.raises(CalibrationError, match=f"^{tmp_path} is not a finished memaudit run \\(no risk.parquet\\)$"):
        reference_risks(tmp_path)


