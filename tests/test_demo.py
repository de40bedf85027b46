"""The main job runs, agrees with PyTorch, reports what the README promises, and its
table fits an 80- and a 120-column terminal without dropping a column."""

import pytest

from attention_jax import cli, demo
from tests.conftest import Screen

ATOL_F32 = 1e-5  # max |difference|, float32: jax vs torch, sharded vs one device
CFG = demo.DemoConfig(batch=2, seq_len=16, embed=32, num_heads=4,
                      variants=(("MHA", 4), ("GQA", 2), ("MQA", 1)), repeats=1,
                      decode_repeats=2)


@pytest.fixture(scope="module")
def run80():
    """One run of the main job on a fake terminal 80 columns wide: ``(rows, screen lines)``."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        screen = Screen(monkeypatch)
        screen.use(80)
        rows = demo.run(CFG)
        return rows, screen.lines()


@pytest.fixture(scope="module")
def rows(run80):
    return run80[0]


def test_demo_rows(rows):
    pytest.importorskip("torch")
    assert [r["variant"] for r in rows] == ["MHA", "GQA", "MQA"]
    for row in rows:
        assert row["max_err_vs_torch"] < ATOL_F32, row
        # K * (H + V) float32 values per token; H = V = 32 / 4
        assert row["kv_bytes_per_token"] == row["K"] * 16 * 4
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["decode_step_ms"] > 0
        # head-parallel on all 8 fake devices (N=4: mesh data=2, model=4)
        assert row["sharded_err"] < ATOL_F32, row
        assert row["fwd_collectives"] == "all-reduce@model:1", row
        # backward: dx summed over model, parameter gradients over data
        assert row["bwd_collectives"] == "all-reduce@model:2, all-reduce@data:1", row
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]


def _check_screen(lines: list[str], rows: list[dict], width: int) -> int:
    """Every line fits ``width``; every column and every row is shown. Returns the tables."""
    text = "\n".join(lines)
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, too_wide
    for column in rows[0]:  # no column dropped or cut
        assert f" {column} " in f"{text} ", column
    tables = sum(line.split()[:1] == ["variant"] for line in lines)
    assert tables >= 1
    for row in rows:  # every stacked table names its rows
        assert sum(line.split()[:1] == [row["variant"]] for line in lines) == tables
    return tables


def test_demo_fits_an_80_column_terminal(run80):
    """The whole run (header, progress bar, tables, caption) at 80 columns."""
    rows, lines = run80
    assert _check_screen(lines, rows, 80) > 1  # stacked
    assert lines[0].startswith("jax ")
    bar = next(line for line in lines if line.startswith("demo "))
    assert "3/3" in bar and "MQA" not in bar  # no leftover section name


def test_demo_table_fits_a_120_column_terminal(rows, screen):
    screen.use(120)
    demo.print_table(rows, caption=demo.NOTES)
    assert _check_screen(screen.lines(), rows, 120) < 4


@pytest.mark.parametrize("width", [80, 120])
def test_stacked_tables_keep_every_cell(rows, width):
    tables = cli.rich_tables(rows, width=width)
    columns = [c.header for t in tables for c in t.columns if c.header != "variant"]
    assert columns == [c for c in rows[0] if c != "variant"]
    for table in tables:
        assert table.columns[0].header == "variant"


def test_config_the_devices_cannot_run_is_refused():
    with pytest.raises(ValueError, match=r"--batch 4 does not split over 3 devices.*data=3"):
        demo.check_config(demo.DemoConfig(batch=4), 3)
    with pytest.raises(ValueError, match="seq_len must be >= 1; got 0"):
        demo.check_config(demo.DemoConfig(seq_len=0), 8)
    demo.check_config(demo.DemoConfig(batch=6), 3)  # data=3 divides 6
