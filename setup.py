"""Packaging detail pyproject.toml cannot express: the top-level ``conf/`` ships inside the wheel as ``lightq/conf``."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["lightq", "lightq.*"]) + ["lightq.conf"],
    package_dir={"lightq.conf": "conf"},
    package_data={"lightq.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"], "lightq.kernels": ["tuned/*.json"]},
)
