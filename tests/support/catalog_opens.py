"""Count the catalog connections a piece of code opens (each costs 15-25 ms and the file lock)."""

from __future__ import annotations

from prefcurate.store import Store


def count_catalog_opens(monkeypatch) -> list[bool]:
    """From now on, each ``Store.connect`` appends its ``read_only`` flag to the list returned."""
    opened: list[bool] = []
    connect = Store.connect

    def counting(self, read_only=False, **kwargs):
        opened.append(read_only)
        return connect(self, read_only=read_only, **kwargs)

    monkeypatch.setattr(Store, "connect", counting)
    return opened
