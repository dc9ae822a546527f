"""The ``surgeon`` command line (installed as ``surgeon.cli``): thin Typer commands over the library."""
