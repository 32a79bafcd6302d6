"""Load benchmark: ``python -m app.devtools.loadtest`` (see ``__main__`` and README, "Capacity").

Starts Redis, the Kallglot emulator (``echo``) and the bridge (one gevent worker) on loopback, pins the bridge
to one core and everything else to the other, and ramps concurrent two-way calls placed by a Node generator
(``generator.mjs``, Node's ``ws``: cheaper per message than the Python relay it measures).
"""
