"""Simulated instruments: a noisy sensor with out-of-order, late and bad readings, and a camera.

:class:`SimulatedSensor` emits ``{"sensor", "seq", "t", "value"}`` readings stamped with event time ``t`` at
the source. Reading ``i`` is due at ``start + i / rate`` (``rate`` readings per second over all sensors,
round robin). A fraction arrives out of order (stamped up to ``jitter`` seconds earlier), a fraction arrives
late (stamped ``late_by`` seconds earlier, past the usual allowed lateness) and a fraction is bad
(``value`` is ``None``). With ``realtime=True`` readings are paced to the wall clock; otherwise they come as
fast as they are pulled. Everything is deterministic for a given ``seed`` and ``start``.

:class:`SimulatedCamera` produces real image arrays (``numpy.uint8``, ``height x width x 3``): a gradient
background, a bright disc that moves with the frame number, sensor noise, and the frame number written in
the first pixels. :class:`CameraSource` turns it into a stream of frames.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch

__all__ = ["CameraSource", "SimulatedCamera", "SimulatedSensor"]


class SimulatedSensor(Source):
    """See the module docstring.

    Args:
        sensors: number of sensors (named ``s0``, ``s1``, ...) or their names.
        rate: readings per second over all sensors (event time spacing, and pacing when ``realtime``).
        count: total readings; ``None`` for an endless stream.
        start: event time of the first reading; ``None`` means the runtime's ``now()`` when the source opens.
        noise: standard deviation of the gaussian noise on values.
        out_of_order: fraction of readings stamped up to ``jitter`` seconds early.
        late: fraction of readings stamped ``late_by`` seconds early.
        bad: fraction of readings whose value is ``None``.
        realtime: pace readings to the wall clock.
        seed: random seed.
    """

    label = "sensor"

    def __init__(
        self,
        sensors: int | Sequence[str] = 4,
        *,
        rate: float = 100.0,
        count: int | None = 1000,
        start: float | None = None,
        noise: float = 0.5,
        out_of_order: float = 0.05,
        jitter: float = 0.3,
        late: float = 0.01,
        late_by: float = 3.0,
        bad: float = 0.01,
        realtime: bool = False,
        seed: int = 42,
        **bounds: Any,
    ) -> None:
        super().__init__(**bounds)
        self.names = [f"s{i}" for i in range(sensors)] if isinstance(sensors, int) else list(sensors)
        if not self.names:
            raise ConfigurationError("SimulatedSensor needs at least one sensor")
        if not rate > 0:
            raise ConfigurationError(f"SimulatedSensor rate must be positive, got {rate}")
        for name, fraction in (("out_of_order", out_of_order), ("late", late), ("bad", bad)):
            if not 0 <= fraction <= 1:
                raise ConfigurationError(f"SimulatedSensor {name} must be a fraction in [0, 1], got {fraction}")
        self.rate = rate
        self.count = count
        self.start = start
        self.noise = noise
        self.out_of_order = out_of_order
        self.jitter = jitter
        self.late = late
        self.late_by = late_by
        self.bad = bad
        self.realtime = realtime
        self.seed = seed

    def readings(self, start: float, n: int | None = None) -> list[dict[str, Any]]:
        """The first ``n`` readings (default ``count``) as a list, without running a pipeline."""
        total = n if n is not None else self.count
        if total is None:
            raise ConfigurationError("readings() of an endless sensor needs n")
        gen = self._generator(start)
        return [next(gen) for _ in range(total)]

    def _generator(self, start: float) -> Any:
        rng = random.Random(self.seed)
        names = self.names
        n_sensors = len(names)
        bases = [20.0 + 2.0 * k for k in range(n_sensors)]
        step = 1.0 / self.rate
        i = 0
        while True:
            k = i % n_sensors
            due = start + i * step
            t = due
            u = rng.random()
            if u < self.late:
                t = due - self.late_by
            elif u < self.late + self.out_of_order:
                t = due - rng.random() * self.jitter
            value: float | None = bases[k] + 1.5 * math.sin(due / 10.0 + k) + rng.gauss(0.0, self.noise)
            if rng.random() < self.bad:
                value = None
            yield {"sensor": names[k], "seq": i, "t": round(t, 6), "value": None if value is None else round(value, 4)}
            i += 1

    resumable = True  # position: {"start", "seq"}: the stream's start and the readings already taken

    def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        return self.open_batches(ctx, batch_size)

    async def open_batches(
        self, ctx: RuntimeContext, batch_size: int, position: Any = None
    ) -> AsyncIterator[SourceBatch]:
        if position:
            start, emitted = float(position["start"]), int(position["seq"])
        else:
            start, emitted = (self.start if self.start is not None else ctx.now()), 0
        gen = self._generator(start)
        for _ in range(emitted):  # the generator is deterministic: skip what was taken before
            next(gen)
        step = 1.0 / self.rate
        wall0 = time.monotonic() - emitted * step
        while True:
            room = self.room(emitted, batch_size)
            if self.count is not None:
                room = min(room, self.count - emitted)
            if room <= 0:
                return
            if self.realtime:
                # Emit what is due by now (at least one reading), then wait for the next one.
                due_now = int((time.monotonic() - wall0) / step) + 1 - emitted
                if due_now <= 0:
                    await asyncio.sleep(wall0 + emitted * step - time.monotonic())
                    continue
                room = min(room, due_now)
            items = [next(gen) for _ in range(room)]
            emitted += len(items)
            yield SourceBatch(items, position={"start": start, "seq": emitted})
            if not self.realtime:
                await asyncio.sleep(0)


class SimulatedCamera:
    """A camera that returns real image arrays; not thread-safe, like a real device handle.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        seed: noise seed.
        exposure: seconds one capture takes (a real camera is not instantaneous).
    """

    def __init__(self, width: int = 160, height: int = 120, *, seed: int = 1, exposure: float = 0.0) -> None:
        if width < 8 or height < 8:
            raise ConfigurationError(f"camera images must be at least 8x8, got {width}x{height}")
        import numpy as np

        self.width = width
        self.height = height
        self.exposure = exposure
        self.frames_taken = 0
        self._rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:height, 0:width]
        self._yy = yy
        self._xx = xx
        base = np.zeros((height, width, 3), dtype=np.float32)
        base[..., 0] = 40 + 80 * xx / width
        base[..., 1] = 40 + 80 * yy / height
        base[..., 2] = 90
        self._base = base

    def capture(self) -> Any:
        """Take one frame: ``uint8`` array of shape ``(height, width, 3)``; frame number in pixel ``[0, 0]``."""
        import numpy as np

        if self.exposure:
            time.sleep(self.exposure)
        n = self.frames_taken
        self.frames_taken += 1
        cx = (self.width / 2) + (self.width / 3) * math.cos(n / 5.0)
        cy = (self.height / 2) + (self.height / 3) * math.sin(n / 5.0)
        r = min(self.width, self.height) / 8
        disc = ((self._xx - cx) ** 2 + (self._yy - cy) ** 2) <= r * r
        image = self._base.copy()
        image[disc] = (250.0, 230.0, 60.0)
        image += self._rng.normal(0.0, 6.0, image.shape).astype(np.float32)
        out = np.clip(image, 0, 255).astype(np.uint8)
        out[0, 0] = (n % 256, (n // 256) % 256, (n // 65536) % 256)
        return out

    @staticmethod
    def frame_number(image: Any) -> int:
        """Read back the frame number a captured image carries."""
        r, g, b = (int(v) for v in image[0, 0])
        return r + 256 * g + 65536 * b


class CameraSource(Source):
    """Frames of a :class:`SimulatedCamera` as ``{"frame", "t", "image"}`` records, at ``fps`` if given."""

    label = "camera"

    def __init__(self, camera: SimulatedCamera, *, frames: int | None = 10, fps: float | None = None, **bounds: Any):
        super().__init__(**bounds)
        self.camera = camera
        self.frames = frames
        self.fps = fps

    async def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        emitted = 0
        while True:
            room = self.room(emitted, 1)
            if room == 0 or (self.frames is not None and emitted >= self.frames):
                return
            image = await asyncio.to_thread(self.camera.capture)
            yield SourceBatch([{"frame": emitted, "t": ctx.now(), "image": image}])
            emitted += 1
            if self.fps:
                await asyncio.sleep(1.0 / self.fps)
