"""Install aa_detection; builds the optional CPU attention kernel `aa_detection._C`.

The extension is built with torch.utils.cpp_extension (as detectron2 builds its own ops) when torch
is importable at build time. Without it, or with AA_DETECTION_NO_EXTENSION=1, the package installs as
pure Python and the attention uses its PyTorch paths. AA_DETECTION_NATIVE=1 adds -march=native (the
shipped build instead compiles the kernel for AVX2 and AVX-512 and picks one at run time).
"""
import glob
import os

from setuptools import find_packages, setup


def extension_modules():
    if os.environ.get("AA_DETECTION_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("aa_detection: torch is not importable at build time, so the CPU attention kernel is not built "
              "(install with `pip install --no-build-isolation -e .`); the PyTorch attention paths are used.")
        return [], {}
    csrc = os.path.join("aa_detection", "layers", "csrc")
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("AA_DETECTION_NATIVE", "0") == "1":
        flags.append("-march=native")
    ext = CppExtension(
        "aa_detection._C",
        sorted(glob.glob(os.path.join(csrc, "*.cpp"))),
        include_dirs=[os.path.abspath(csrc)],
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="aa_detection",
    version="0.1.0",
    description="Attention Augmented Convolutional Networks (Bello et al., 2019) for detectron2",
    packages=find_packages(include=["aa_detection", "aa_detection.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision", "pycocotools>=2.0.2", "fvcore>=0.1.5"],
    extras_require={"test": ["pytest"], "timm": ["timm>=1.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
