"""S4: a single-owner instrument behind a queue (the camera of the seed).

Only one process may own the camera. The camera service owns it and answers commands on the queue
``service-camera``: ``{"command": "take_picture"}`` replies with the frame (a real ``uint8`` image array) and
its metadata; ``{"command": "quit"}`` ends the service. Many clients ask at once; the service serialises access
(one request at a time). The client keeps a log of replies and saves the last frame as a PNG.

    python examples/camera_service.py                    # service + 10 concurrent clients, embedded broker
    python examples/camera_service.py --role service --broker amqp://guest:guest@127.0.0.1:5672/
    python examples/camera_service.py --role client --broker amqp://guest:guest@127.0.0.1:5672/
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskstream.brokers.base import Broker, broker_from_url
from taskstream.stream_ops.service import Service, ServiceClient
from taskstream.stream_ops.sources import SimulatedCamera


def make_service(*, width: int = 160, height: int = 120, exposure: float = 0.002, lock_path: Any = None) -> Service:
    """The camera service: it creates (owns) the camera and answers ``take_picture``."""
    camera = SimulatedCamera(width, height, exposure=exposure)

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command") if isinstance(request, dict) else None
        if command == "take_picture":
            image = camera.capture()
            return {
                "frame": SimulatedCamera.frame_number(image),
                "taken_at": time.time(),
                "shape": list(image.shape),
                "image": image,
                "requester": request.get("requester"),
            }
        if command == "status":
            return {"frames_taken": camera.frames_taken, "size": [camera.width, camera.height]}
        raise ValueError(f"unknown camera command {command!r} (known: take_picture, status, quit)")

    return Service("camera", handle, lock_path=lock_path)


@dataclass
class ReplyLog:
    """What a client saw: one line per reply, and the last frame."""

    lines: list[str] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    last_image: Any = None


async def requester(broker: Broker, name: str, pictures: int, log: ReplyLog, *, timeout: float = 30.0) -> None:
    """One client: its own reply queue, ``pictures`` requests one after another."""
    async with ServiceClient(broker) as client:
        for i in range(pictures):
            started = time.perf_counter()
            reply = await client.call("camera", {"command": "take_picture", "requester": name}, timeout=timeout)
            waited = time.perf_counter() - started
            log.frames.append(reply["frame"])
            log.last_image = reply["image"]
            log.lines.append(
                f"{name} #{i}: frame {reply['frame']} {tuple(reply['shape'])} after {waited * 1000:.1f} ms"
            )


async def run_clients(broker: Broker, *, clients: int = 10, pictures: int = 3) -> ReplyLog:
    """``clients`` requesters at once, each asking for ``pictures`` frames."""
    log = ReplyLog()
    await asyncio.gather(*(requester(broker, f"client-{c}", pictures, log) for c in range(clients)))
    return log


def save_frame(image: Any, path: str) -> None:
    """Show the frame the way a person would look at it: a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, image)


async def main(argv: list[str] | None = None) -> ReplyLog | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="memory://")
    parser.add_argument("--role", choices=["both", "service", "client"], default="both")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--pictures", type=int, default=3)
    parser.add_argument("--png", default="out/camera_last_frame.png")
    args = parser.parse_args(argv)
    broker = broker_from_url(args.broker)
    async with broker:
        if args.role == "service":
            service = make_service()
            print("camera service: owning the camera, answering on 'service-camera' (send quit to end)")
            await service.run(broker)
            print(f"camera service: done after {service.handled} pictures")
            return None
        service = make_service() if args.role == "both" else None
        if service is not None:
            await service.start(broker)
        try:
            log = await run_clients(broker, clients=args.clients, pictures=args.pictures)
        finally:
            if service is not None:
                await service.stop()
    for line in log.lines:
        print(line)
    if log.last_image is not None:
        save_frame(log.last_image, args.png)
        print(f"{len(log.frames)} frames, all distinct: {len(set(log.frames)) == len(log.frames)}; last -> {args.png}")
    return log


if __name__ == "__main__":
    asyncio.run(main())
