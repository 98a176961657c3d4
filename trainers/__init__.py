"""Reference continual-learning trainers and benchmarks that use carousel's public API only.

Today: data set readers (:mod:`trainers.datasets`) and the end-to-end demo
(``python -m trainers demo``). The CL methods (ER, DER++, iCaRL, GDumb, GCR) build on these.
"""
