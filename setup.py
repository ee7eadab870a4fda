"""The package list, found rather than written out: every folder with an ``__init__.py`` under
the five top-level folders installs as ``plait.<folder>.<sub>`` (pyproject's package-dir maps
each top-level folder; setuptools places sub-packages under it), so a new family folder under
models/ needs no edit here or in pyproject. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

TOP = ("launcher", "models", "kernels", "parallel", "data", "errors")

setup(packages=[f"plait.{p}" for p in find_packages(include=[*TOP, *(f"{t}.*" for t in TOP)])])
