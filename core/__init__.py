"""Light shared pieces used by api/, tasks/, backends/ and client/: settings, errors, wire codec, registry.

Nothing in core/ imports torch, so api/ can use all of it.
"""
