"""The ``casc`` command: the application layer over the ``detector`` library, ``eval`` and ``service``.

``casc.cli.main`` wires the sub-commands; ``python -m casc`` runs it.
"""
