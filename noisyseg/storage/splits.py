"""Train/val/test assignment of a store's labelled cases, split files and clean-case lists.

The rule (``assign_splits``): sort the case ids, permute their positions with
``numpy.random.default_rng([seed, 7919])``; the first ``round(test_fraction * N)`` are ``test``,
the next ``round(val_fraction * N)`` are ``val``, the rest ``train`` (at least one ``train`` case
must remain). The result depends only on the set of ids, the seed and the fractions, so a
resumed ingest assigns every case the split it had. ``unlabeled`` cases never take part.

A split file is either nnU-Net's ``splits_final.json`` (a list of folds ``{"train": [...],
"val": [...]}``; one fold is used, 0 by default) or an object ``{"train": [...], "val": [...],
"test": [...]}``. A clean-case list is a text file with one case id per line (``#`` comments and
blank lines ignored) or a JSON list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V

#: Second seed word of the split permutation (kept from ``noisyseg synth``'s rule).
SPLIT_SEED_WORD = 7919


def split_positions(n: int, seed: int, *, val_fraction: float, test_fraction: float) -> list[str]:
    """Split of each of ``n`` positions (see module docs)."""
    V.check_rate(val_fraction, name="val fraction")
    V.check_rate(test_fraction, name="test fraction")
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * n)
    if n and n_test + n_val >= n:
        raise NoisysegInputError(
            f"test fraction {test_fraction} + val fraction {val_fraction} leave no training case "
            f"out of {n}"
        )
    order = np.random.default_rng([int(seed), SPLIT_SEED_WORD]).permutation(n)
    splits = ["train"] * n
    for i in order[:n_test]:
        splits[int(i)] = "test"
    for i in order[n_test : n_test + n_val]:
        splits[int(i)] = "val"
    return splits


def assign_splits(
    case_ids: Iterable[str], *, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, str]:
    """case id -> ``train``/``val``/``test`` by the documented rule (ids sorted first)."""
    ids = sorted(set(case_ids))
    splits = split_positions(len(ids), seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return dict(zip(ids, splits, strict=True))


def _read_json_or_lines(path: str | Path, what: str) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise NoisysegInputError(f"{what} cannot be read ({e.strerror})", path=str(p)) from None
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise NoisysegInputError(f"{what} is not valid JSON ({e})", path=str(p)) from None
    return text


def read_splits_file(path: str | Path, fold: int = 0) -> dict[str, str]:
    """case id -> split from a split file (see module docs).

    Raises:
        NoisysegInputError: unreadable, malformed, a missing fold, or an id in two splits.
    """
    doc = _read_json_or_lines(path, "split file")
    if isinstance(doc, list):
        if not 0 <= fold < len(doc):
            raise NoisysegInputError(
                f"split file has {len(doc)} fold(s), fold {fold} requested", path=str(path)
            )
        doc = doc[fold]
    if not isinstance(doc, dict) or not set(doc) <= set(V.SPLITS):
        raise NoisysegInputError(
            "split file must be nnU-Net's splits_final.json (a list of {train, val} folds) or "
            "an object {train: [...], val: [...], test: [...]}",
            path=str(path),
        )
    out: dict[str, str] = {}
    for split, ids in doc.items():
        if not isinstance(ids, list):
            raise NoisysegInputError(f"split file: {split!r} must be a list", path=str(path))
        for cid in ids:
            if str(cid) in out and out[str(cid)] != split:
                raise NoisysegInputError(
                    f"split file puts case {cid!r} in both {out[str(cid)]} and {split}",
                    path=str(path),
                )
            out[str(cid)] = split
    return out


def read_case_list(path: str | Path) -> list[str]:
    """Case ids of a clean-case list (text, one per line, or a JSON list)."""
    doc = _read_json_or_lines(path, "case list")
    if isinstance(doc, str):
        ids = [ln.split("#", 1)[0].strip() for ln in doc.splitlines()]
        return [i for i in ids if i]
    if isinstance(doc, list) and all(isinstance(i, str) for i in doc):
        return list(doc)
    raise NoisysegInputError("case list must be one id per line or a JSON list", path=str(path))


def check_known(ids: Iterable[str], known: Iterable[str], *, what: str, path: str) -> None:
    """Raise naming the first id of ``ids`` that is not in ``known``."""
    known_set = set(known)
    unknown = sorted(set(ids) - known_set)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise NoisysegInputError(
            f"{what}: case {unknown[0]!r}{more} not among the dataset's cases", path=path
        )


def plan_splits(
    labelled: Sequence[str],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    splits_file: str | None = None,
    fold: int = 0,
) -> dict[str, str]:
    """Split of every labelled case: from ``splits_file`` when given (cases it does not name
    stay ``train``), else by :func:`assign_splits`."""
    if splits_file is None:
        return assign_splits(
            labelled, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
    mapping = read_splits_file(splits_file, fold)
    check_known(mapping, labelled, what="split file", path=str(splits_file))
    return {cid: mapping.get(cid, "train") for cid in labelled}


def apply_splits(store: Any, splits: Mapping[str, str]) -> dict[str, int]:
    """Write ``splits`` into a store's index (one :meth:`set_split` per split); returns counts."""
    counts: dict[str, int] = {}
    for split in V.SPLITS:
        ids = sorted(cid for cid, s in splits.items() if s == split)
        if ids:
            store.set_split(ids, split)
        counts[split] = len(ids)
    return counts


def resplit_store(
    store: Any,
    *,
    seed: int = 0,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    splits_file: str | None = None,
    fold: int = 0,
    clean_cases: str | None = None,
) -> dict[str, int]:
    """``noisyseg split``: when a fraction or ``splits_file`` is given, re-assign train/val/test
    over the store's labelled cases (every case whose split is not ``unlabeled``; a fraction not
    given is 0); with ``clean_cases``, set the clean flag to exactly the listed cases. Returns
    cases per split (and ``clean``).

    Raises:
        NoisysegInputError: nothing to do, bad fractions or files, unknown case ids.
    """
    resplit = val_fraction is not None or test_fraction is not None or splits_file is not None
    if not resplit and clean_cases is None:
        raise NoisysegInputError(
            "nothing to do: give --val-fraction/--test-fraction, --splits or --clean-cases"
        )
    index = store.index()
    labelled = index.loc[index["split"] != V.UNLABELED, "case_id"].tolist()
    counts: dict[str, int] = {}
    if resplit:
        plan = plan_splits(
            labelled,
            seed=seed,
            val_fraction=val_fraction or 0.0,
            test_fraction=test_fraction or 0.0,
            splits_file=splits_file,
            fold=fold,
        )
        counts = apply_splits(store, plan)
    if clean_cases is not None:
        ids = read_case_list(clean_cases)
        check_known(ids, labelled, what="clean-case list", path=str(clean_cases))
        others = sorted(set(index["case_id"]) - set(ids))
        if others:
            store.set_clean(others, False)
        if ids:
            store.set_clean(sorted(set(ids)), True)
        counts["clean"] = len(set(ids))
    return counts
