"""``noisyseg audit``: a ranked review list of the lesions a labelled set probably misses.

* :mod:`noisyseg.audit.run` — predict a split, extract and rank the suspected missed lesions
  (rules in :mod:`noisyseg.candidates`), write the table and pictures, log them to MLflow, and
  write a repaired label set from accepted candidates.
* :mod:`noisyseg.audit.figures` — the picture of one candidate (three orthogonal slices).
* :mod:`noisyseg.audit.commands` — the command line (imported by ``noisyseg.cli`` only).
"""

#: Candidate threshold of the review list. Low on purpose: the list is ranked by max probability,
#: so a lower threshold only appends weaker candidates after the strong ones, and a list shorter
#: than the reviewer's budget is recall left on the table. Measured on the default brain audit
#: (seed 0, 50 % random censoring, lopsided model): the whole list at 0.5 held 52 candidates for 89
#: censored lesions; censored lesions >= 4 mm found in the top 2N: 0.5 -> 77 %, 0.2 -> 80 %,
#: 0.1 -> 83 % (BCE model 39 / 52 / 58 %); benchmarks/RESULTS.md.
DEFAULT_THRESHOLD = 0.1
