"""The wire contract: what a client, the broker and a worker all speak.

Frames and ops (``protocol``, ``headers``, ``ops``), the value codec (``codec``, ``decoding``,
``wiretypes``, ``record``, ``ref``, ``byvalue``, ``usercode``, ``codestore``, ``sessiondir``), the
error tree (``errors``) and errors rebuilt from the wire (``remoteerror``), and where sockets are
and how they are set up (``sockets``, ``zmqfast``). It imports nothing else of dspex: the client
(``dspex.client``) and the stack tooling (``dspex.stack``) build on it, never the other way round.
"""
