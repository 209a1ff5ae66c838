"""Benchmarks: ``make bench`` runs every ``bench/*_bench.py`` and prints its figures.

Each benchmark is a script with a ``main()`` that prints human-readable
figures and the targets the issues name.  They are measurements, not tests:
nothing here fails because a number is slow.
"""
