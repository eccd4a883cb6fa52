"""Test data: an implementation module that fails on import the way a kernel library with a broken ABI does.

``BackendSpec.load()`` must turn this into one ``BackendUnavailable`` naming the install command. Not a test.
"""

raise RuntimeError("undefined symbol: _ZN3c104cuda9SetDeviceEi (kernel library built against another torch)")
