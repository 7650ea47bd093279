"""The test suite's shared helpers, in one place.

* :mod:`tests.support.waiting`: polling with a deadline (``wait_for`` async, ``wait_until`` sync).
* :mod:`tests.support.ports`: free local ports.
* :mod:`tests.support.proxy`: a TCP proxy that cuts connections and goes down and up on its port.
* :mod:`tests.support.servers`: private RabbitMQ and Azurite servers a test may stop and crash.
* :mod:`tests.support.require`: a missing server or tool skips locally and fails where every claim is required.
* :mod:`tests.support.names`: queue names unique to a run.
"""
