"""One progress bar per stage, on stderr, for passes that are usually quick but can be long."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def quiet_bar(
    items: Iterable[T],
    desc: str,
    unit: str = "shard",
    enabled: bool = True,
    total: int | None = None,
) -> Iterable[T]:
    """`items` wrapped in a tqdm bar that appears only once the pass has run 3 s (tqdm's `delay`), so a
    small data set's command prints its result line and nothing else, and a large one shows its progress.
    """
    from tqdm import tqdm

    return tqdm(
        items,
        desc=desc,
        unit=unit,
        total=total,
        file=sys.stderr,
        delay=3.0,
        disable=not enabled,
        mininterval=1.0,
    )
