"""Keyword options of the Python API as the typed configs the command line uses: each keyword names a field of one
config section (`steps` is `train.steps`, `importance_minimality_coeff` is `method.importance_minimality_coeff`),
a whole section may be given as a config object or a dict (`train=TrainConfig(...)`), and the result is validated
as strictly as a YAML file, so everything a config file can say a notebook can say."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from unmerge.config import StrictModel
from unmerge.errors import ConfigError

Section = StrictModel | Mapping[str, Any] | None


def section_data(given: Section) -> dict[str, Any]:
    """A section given as a config object or a dict, as plain data (nothing given: empty)."""
    return given.model_dump() if isinstance(given, BaseModel) else dict(given or {})


def sectioned(options: Mapping[str, Any], fields: Mapping[str, Iterable[str]], source: str) -> dict[str, dict]:
    """Sort keyword options into config sections by the field each names; a keyword that names no field of any
    section is an error naming the closest fields."""
    owner: dict[str, str] = {}
    for section, names in fields.items():
        for name in names:
            owner.setdefault(name, section)
    placed: dict[str, dict[str, Any]] = {section: {} for section in fields}
    for key, value in options.items():
        if key not in owner:
            close = difflib.get_close_matches(key, owner, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown option {key!r}{hint}; the options are the fields of the config sections "
                f"{', '.join(fields)} (see help({source}))"
            )
        placed[owner[key]][key] = value
    return placed
