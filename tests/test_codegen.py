"""Every Triton kernel configuration a launcher can choose compiles offline for sm_80 and sm_90 without spills.

No GPU needed: ``triton.compile`` targets the architectures explicitly and ptxas reports registers and spill
bytes (see fusednorm/backends/triton/codegen.py). One test per kernel file so a failure names its family.
"""

from __future__ import annotations

import pytest

from fusednorm.backends.triton import codegen

FAMILIES = codegen._families()


def test_every_kernel_file_lists_its_configs():
    missing = [f for f in FAMILIES if not codegen.family_configs(f)]
    assert not missing, f"kernel files without kernel_configs(): {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiles_for_sm80_and_sm90_without_spills(family):
    rows = codegen.compile_report(archs=(80, 90), families=(family,))
    assert rows, f"{family}: nothing compiled"
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    bad = [f"{r['arch']} {r['kernel']} {r['config']}: {r['error']}" for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert all(r["registers"] and r["registers"] <= 255 for r in rows)
