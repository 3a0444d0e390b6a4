from setuptools import find_packages, setup

setup(
    name="aa_detection",
    version="0.1.0",
    description="Attention Augmented Convolutional Networks (Bello et al., 2019) for detectron2",
    packages=find_packages(include=["aa_detection", "aa_detection.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision", "pycocotools>=2.0.2", "fvcore>=0.1.5"],
    extras_require={"test": ["pytest"]},
)
