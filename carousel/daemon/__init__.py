"""The daemon's room: everything that runs the service (``carousel serve``) or talks to it (``carousel.connect``).
May import the memory core and ``carousel.kinds``; nothing in the core or the kinds imports it.

A request from a trainer enters at ``client.py`` (its process), crosses the socket as frames
(``wire.py``) or shared memory (``shm.py``, ``shm_ring.py``), is accepted by ``service.py``, read and
decoded by ``connection.py`` and reaches the memory in ``handlers.py`` (one function per operation).
``spawn.py`` (``carousel.spawn``) starts a private daemon as a child process of the trainer and connects.
``docs/design.md`` has the whole map; importing this package imports nothing (no torch).
"""
