"""A registry of dictionary architectures: the config's `activation` (or a SAELens `architecture`) names the class
that builds the dictionary. It refuses a second class under a name it already has."""

from __future__ import annotations

from unmerge.errors import ConfigError, UnmergeError
from unmerge.sae.dictionary import Dictionary


class Registry:
    """Dictionary classes by their `activation` name."""

    def __init__(self, *classes: type[Dictionary]) -> None:
        self._classes: dict[str, type[Dictionary]] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: type[Dictionary]) -> type[Dictionary]:
        """Add `cls` under its `activation`; an error if that name is taken."""
        if cls.activation in self._classes:
            raise ValueError(
                f"a dictionary architecture named {cls.activation!r} is registered already "
                f"({self._classes[cls.activation].__name__}); give {cls.__name__} another `activation`"
            )
        self._classes[cls.activation] = cls
        return cls

    def names(self) -> list[str]:
        return list(self._classes)

    def __getitem__(self, activation: str) -> type[Dictionary]:
        if activation not in self._classes:
            raise ConfigError(f"unknown dictionary activation {activation!r}; choose one of {', '.join(self._classes)}")
        return self._classes[activation]

    def for_saelens(self, architecture: str) -> type[Dictionary]:
        """The class SAELens's `architecture` is imported as (a BatchTopK dictionary is saved as JumpReLU)."""
        readers = {
            name: cls
            for cls in self._classes.values()
            if cls.saelens_imported
            for name in (cls.saelens_name, *cls.saelens_transcoders.values())
            if name is not None  # an architecture SAELens does not have
        }
        if architecture not in readers:
            supported = ", ".join(sorted(readers))
            raise UnmergeError(f"SAELens architecture {architecture!r} cannot be imported; supported: {supported}")
        return readers[architecture]
