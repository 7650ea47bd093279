"""The two-stage consumer chain example, on the memory broker."""

from __future__ import annotations

from examples import two_stage


async def test_two_stage_chain_prices_every_order() -> None:
    results = await two_stage.main()
    assert len(results) == 10
    totals = sorted((r["item"], r["total"]) for r in results)  # type: ignore[index]
    assert ("apple", 0.5) in totals  # quantity 1 x 0.5
    assert ("fig", 3.75) in totals  # quantity 3 x 1.25
    assert ("apple", 5.0) in totals  # the tenth order: quantity 10 x 0.5
