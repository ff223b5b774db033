"""Package layout only; metadata lives in pyproject.toml.

conf/, data_tools/ and launch/ sit at the repository root where users look for them, and
install as sora_train.conf, sora_train.data_tools and sora_train.launch (editable or wheel).
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"sora_train.conf": "conf", "sora_train.data_tools": "data_tools", "sora_train.launch": "launch"}

packages = find_namespace_packages(include=["sora_train", "sora_train.*"], exclude=["sora_train.*.__pycache__"])
package_dir = {"sora_train": "sora_train"}
for name, root in ROOTS.items():
    package_dir[name] = root
    packages += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(where=root, exclude=["*__pycache__*", "local*"])]

setup(packages=packages, package_dir=package_dir)
