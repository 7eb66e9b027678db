"""One registration mechanism for the model's extension points (topologies, balances): a class
registers under a name with a decorator, and the config validates names against the table."""

from __future__ import annotations


def registry(table: dict):
    """A decorator factory ``register(name)`` that sets ``cls.name`` and adds ``cls`` to
    ``table``."""

    def register(name: str):
        def add(cls):
            cls.name = name
            table[name] = cls
            return cls
        return add

    return register
