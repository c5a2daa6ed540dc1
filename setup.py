# All metadata lives in pyproject.toml; this file lets older pip versions do editable installs.
from setuptools import setup

setup()
