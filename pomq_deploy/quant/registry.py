"""A named registry of entries (schemes, roundings): what the command line's choices, the schemas' name
fields and the docs' tables read."""

from typing import Annotated, Generic, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Entries by their ``name``; ``lookup`` refuses an unknown name listing the allowed ones."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, entry: T) -> T:
        self[entry.name] = entry
        return entry

    def lookup(self, name: str) -> T:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self)}")
        return self[name]

    def name_field(self):
        """A schema field type holding a registered entry's name."""
        def known(name: str) -> str:
            self.lookup(name)
            return name
        return Annotated[str, AfterValidator(known)]
