"""The client: what a user process imports to run calls in a pool.

``sync`` (``dspex.connect``) and ``aio`` (``dspex.aio.connect``) are the two client kinds; both
serve the one session API of ``api``. ``exchange`` is one request's way out and back, ``routing``
the endpoint map's several brokers, ``endpoints`` which broker a client talks to, ``config`` its
settings from the environment; ``sessionpickle``, ``sendcache`` and ``codeindex`` pickle a
session's code once; ``output`` forwards a call's output.
It builds on ``dspex.wire`` only.
"""
