"""Stack tooling, used only by the broker, the workers and ``dspexctl``, never by a client.

``pools`` (the pools file), ``supervisor`` (talking to supervisord), ``health`` (the pool and stack
states, failure kinds), ``logs`` (the log line format), ``rundir`` (the run directory's rules). It
builds on ``dspex.wire`` only.
"""
