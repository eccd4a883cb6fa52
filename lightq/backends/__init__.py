"""Backends: the contract (``spec``, ``base``), the entry-point registry (``registry``), the torch backend."""
