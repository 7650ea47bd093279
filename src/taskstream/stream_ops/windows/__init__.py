"""Windows in three parts, as in Bytewax: a clock, a windower and the logic that joins them.

========================  =======================================================================================
Module                    Holds
========================  =======================================================================================
``windows.clock``         :class:`EventClock`, :class:`SystemClock`, :class:`ManualTime`: a record's time, and the
                          per-key :class:`ClockLogic` that alone decides how the watermark moves
``windows.windowers``     :class:`TumblingWindow`, :class:`SlidingWindow`, :class:`SessionWindow`: which windows a
                          time belongs to, and the :class:`OpenWindows` of one key
``windows.logic``         :class:`WindowLogic`: one key's clock and open windows; closes what the watermark passed
``windows.operator``      ``stream.window(...)``: :class:`WindowedStream` and the window step's builder
========================  =======================================================================================

A new clock is a :class:`Clock` with ``build``; a new windower is a :class:`Windower` with ``assign`` (or its own
``open_windows``). Neither needs a change to the logic. The public names are exported from
:mod:`taskstream.stream_ops`; this package imports nothing, so its modules load in any order.
"""
