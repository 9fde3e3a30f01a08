"""``noisyseg audit``: a ranked review list of the lesions a labelled set probably misses.

* :mod:`noisyseg.audit.run` — predict a split, extract and rank the suspected missed lesions
  (rules in :mod:`noisyseg.candidates`), write the table and pictures, log them to MLflow, and
  write a repaired label set from accepted candidates.
* :mod:`noisyseg.audit.figures` — the picture of one candidate (three orthogonal slices).
* :mod:`noisyseg.audit.commands` — the command line (imported by ``noisyseg.cli`` only).
"""
