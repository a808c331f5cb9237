"""LASP-1 ring baseline against the fp64 single-device reference on 2, 3 and 4 gloo ranks."""

from __future__ import annotations

import pytest
from sp_harness import check_case
from sp_worker import case_names

CASES = [c for c in case_names("ops", 2) if c.startswith("lasp1")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", (2, 3, 4))
def test_ring_case(world: int, case: str) -> None:
    check_case("ops", world, case)
