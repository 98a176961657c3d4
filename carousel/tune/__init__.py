"""``carousel tune``: measure candidate tier paths and this machine, plan a profile that fits them,
and check a running daemon against the plan (:mod:`.measure`, :mod:`.plan`, :mod:`.check`)."""
