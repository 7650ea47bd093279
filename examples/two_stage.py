"""Two consumers chained by queues: ``orders.in -> enrich -> orders.priced -> total -> orders.out``.

Run it on the embedded broker (feeds ten orders, prints the results)::

    python examples/two_stage.py

or serve it on a real broker and feed it from any client::

    taskstream run examples.two_stage:app --broker amqp://guest:guest@127.0.0.1:5672/
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from taskstream import App
from taskstream.messages import decode

app = App()

PRICES = {"apple": 0.5, "pear": 0.75, "fig": 1.25}


class Order(BaseModel):
    item: str
    quantity: int


class PricedOrder(Order):
    unit_price: float


@app.consumer("orders.in", publish_to="orders.priced")
def enrich(order: Order) -> PricedOrder:
    """Stage 1 (sync, runs on a thread): look up the price."""
    return PricedOrder(**order.model_dump(), unit_price=PRICES[order.item])


@app.consumer("orders.priced", publish_to="orders.out")
async def total(order: PricedOrder) -> dict[str, object]:
    """Stage 2 (async, runs on the loop): compute the total."""
    return {"item": order.item, "total": round(order.quantity * order.unit_price, 2)}


async def main() -> list[object]:
    results: list[object] = []
    async with app:
        await app.broker.declare("orders.out")
        for i, item in enumerate(["apple", "pear", "fig"] * 3 + ["apple"]):
            await app.publish("orders.in", Order(item=item, quantity=i + 1))
        async with app.broker.consume("orders.out", prefetch=16) as out:
            async for delivery in out:
                results.append(decode(delivery.body).body)
                await delivery.ack()
                if len(results) == 10:
                    break
    return results


if __name__ == "__main__":
    for row in asyncio.run(main()):
        print(row)
