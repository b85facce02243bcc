"""The package list: the code's packages, found, plus the product's top-level folders that
setup.cfg's ``package_dir`` maps into them (everything else about the build is in setup.cfg)."""

from setuptools import find_packages, setup

MAPPED = ["app.templates", "app.migrations", "agent.scripts"]

setup(packages=find_packages(include=["app", "app.*", "agent", "agent.*"]) + MAPPED)
