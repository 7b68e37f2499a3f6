"""The one table formatter (perf/table.py) and the command tables made of it."""
import pytest


def test_columns_align_the_header_and_rows_alike():
    from tritonrnn.perf.table import Columns

    columns = Columns(("case", "<6"), ("ms", ">7"), rest="status", gap="  ")
    assert columns.header() == "case        ms  status"
    assert columns.line("a", "1.500", "ok") == "a        1.500  ok"
    assert columns.line("toolongcase", 3) == "toolongcase       3"  # a long cell is kept whole; no free column
    assert Columns(("key", "<4")).header() == "key "
    with pytest.raises(ValueError, match="3 cells for 1 columns"):
        Columns(("key", "<4")).line("a", "b", "c")


def test_output_layer_and_privacy_tables_share_one_layout():
    from tritonrnn.perf import output_layer, privacy

    row = {"case": "output-N8-V4-H2", "provider": "tritonrnn", "mode": "ghost", "median_ms": 1.5,
           "peak_memory_bytes": 3 * 2 ** 19, "loss": 2.0, "status": "ok", "error": None, "backend": "triton"}
    failed = dict(row, median_ms=None, peak_memory_bytes=None, loss=None, status="error", error="RuntimeError: oom")
    assert output_layer.format_rows([row, failed]).splitlines() == [
        "case                         provider    median ms   peak MiB     loss  status",
        "output-N8-V4-H2              tritonrnn       1.500        1.5   2.0000  ok",
        "output-N8-V4-H2              tritonrnn           -          -        -  error: RuntimeError: oom"]
    assert privacy.format_rows([row]).splitlines() == [
        "case                         mode          median ms   peak MiB     loss  status",
        "output-N8-V4-H2              ghost             1.500       1.50   2.0000  ok"]
