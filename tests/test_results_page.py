"""`make bench` rewrites only its blocks of the results page, with tables computed from the searches."""

from __future__ import annotations

import json

import pytest

from sloserve_runtime.core.step_time import StepTimeModel, resolve_profile
from sloserve_runtime.measure.ceiling import work_ceiling
from sloserve_runtime.measure.results import (
    SIX,
    TABLES,
    CapacityTable,
    capacities_of,
    jobs,
    replace_block,
    run_job,
    table_markdown,
    write_results,
)
from sloserve_runtime.workload.scenarios import load_scenario

PAGE = """# Benchmarks

Some prose that stays.

<!-- bench:a100 -->
old table
<!-- /bench:a100 -->

More prose.

<!-- bench:h200 -->
old
<!-- /bench:h200 -->

<!-- bench:plots -->
<!-- /bench:plots -->
"""


def fake_entries(tables: tuple[CapacityTable, ...]) -> dict:
    """Ours at twice stock's capacity without speculation, and at three times with it (all under
    every scenario's work ceiling)."""
    entries = {}
    for job in jobs(tables):
        base = 0.005 if job.scenario in SIX else 0.0025
        factor = (2.0 if job.scheduler == "sloserve" else 1.0) * (3.0 if job.drafts else 1.0)
        entries[job] = {"scenario": job.scenario, "scheduler": job.label, "capacity_rps": base * factor}
    return entries


def test_the_page_gets_each_table_its_data_and_plots_and_keeps_its_prose(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    written = write_results(fake_entries(TABLES), page, tmp_path)
    text = page.read_text()
    assert "Some prose that stays." in text and "More prose." in text and "old table" not in text
    for table in TABLES:
        block = text.split(f"<!-- bench:{table.marker} -->")[1].split(f"<!-- /bench:{table.marker} -->")[0]
        assert f"--profile {table.profile}" in block and f"--num-requests {table.num_programs}" in block
        assert "| chatbot | 0.01 | 0.005 | 0.03 | 0.015 | 2.00x | 6.00x | 2.00x |" in block
        assert "| **geo mean (six)** |  |  |  |  | **2.00x** | **6.00x** | **2.00x** |" in block
        assert "| burst | 0.005 | 0.0025 | 0.015 | 0.0075 | 2.00x | 6.00x | 2.00x |" in block
        # Beside each scenario, its work ceiling on the table's profile and ours as a share of it.
        model = StepTimeModel.load(resolve_profile(table.profile))
        ceiling = work_ceiling(load_scenario("chatbot"), model).rate
        assert (
            f"| chatbot | 0.01 | 0.005 | 0.03 | 0.015 | 2.00x | 6.00x | 2.00x | {ceiling:.3g} | {0.01 / ceiling:.0%} |"
            in block
        )
        data = json.loads((tmp_path / table.data_file).read_text())
        assert data["profile"] == table.profile and len(data["results"]) == len(jobs([table]))
        assert f"![sim-{table.marker}-capacity](sim-{table.marker}-capacity.png)" in text
    assert all(path.exists() for path in written)


def test_a_page_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="bench:a100"):
        replace_block("# no markers here\n", "a100", "table")


def test_one_search_gives_the_capacity_simulate_gives():
    """A job is `sloserve simulate --capacity` for one scenario, scheduler and speculation length."""
    small = CapacityTable("small", "a100-opt13b-slos-serve", 20, speculative_tokens=(0,))
    job = next(job for job in jobs([small]) if job.scenario == "chatbot" and job.scheduler == "vllm")
    entry = run_job(job)
    assert entry["scheduler"] == "vllm" and entry["capacity_rps"] > 0
    assert entry["attainment"] >= 0.9


def test_a_capacity_above_the_work_ceiling_is_marked_and_left_out_of_the_ratios():
    """The probe's programs can end before their load builds up: a capacity past the ceiling is
    no steady capacity, so it is marked, and the ratios with it and their geo mean leave it out."""
    table = TABLES[1]
    model = StepTimeModel.load(resolve_profile(table.profile))
    ceiling = work_ceiling(load_scenario("chatbot"), model).rate
    entries = fake_entries((table,))
    for job, entry in entries.items():
        if job.scenario == "chatbot" and job.label == "sloserve":
            entry["capacity_rps"] = 2 * ceiling
    block = table_markdown(table, capacities_of(entries, table), "provenance")
    row = next(line for line in block.splitlines() if line.startswith("| chatbot |"))
    assert row.startswith(f"| chatbot | {2 * ceiling:.3g} † | 0.005 | 0.03 | 0.015 | - | 6.00x | 2.00x |")
    assert "| **geo mean (six)** |  |  |  |  | **2.00x** (5 of 6) | **6.00x** | **2.00x** |" in block
    assert "A capacity marked † is above it" in block
