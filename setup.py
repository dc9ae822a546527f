"""Package discovery. Everything else is declared in pyproject.toml.

Every package under surgeon/ ships, found by walking the tree (a new subpackage needs no entry here); the
checkout's top-level cli/ and recipes/ folders ship inside it as surgeon.cli and surgeon.recipes, so an installed
wheel adds no generic top-level import names.
"""

from setuptools import find_packages, setup

MAPPED = {"surgeon": "surgeon", "surgeon.cli": "cli", "surgeon.recipes": "recipes"}

packages = [f"{name}.{sub}" if sub else name for name, folder in MAPPED.items() for sub in ["", *find_packages(folder)]]
setup(packages=packages, package_dir=MAPPED)
