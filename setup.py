from setuptools import find_packages, setup

setup(
    name="openrlhf-sepo",
    version="0.1.0.dev0",
    description="Selective Preference Optimization (token-level key-token DPO) as an OpenRLHF plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["openrlhf_sepo", "openrlhf_sepo.*"]),
    package_data={"openrlhf_sepo": ["bench/demo_settings.json", "bench/tkpo_settings.json",
                                    "bench/testbed_settings.json"]},  # tuned settings
    python_requires=">=3.10",
    # Only what the package imports directly. torch, deepspeed and transformers are left unpinned
    # so that the versions OpenRLHF (which pins them) already installed stay in place.
    install_requires=[
        "openrlhf>=0.11.2,<0.12",
        "torch",
        "deepspeed",
        "transformers",
        "datasets",
        "pyarrow",
        "tqdm",
        "numpy",
    ],
    extras_require={"report": ["matplotlib"]},
    entry_points={
        "console_scripts": [],
    },
)
