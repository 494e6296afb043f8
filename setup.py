from setuptools import find_packages, setup

setup(
    name="mtkd",
    version="0.1.0",
    description="Multi-teacher, multi-task knowledge distillation for image classification",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mtkd", "mtkd.*", "tasks"]),
    install_requires=[
        "torch>=2.2",
        "torchvision>=0.17",
        "timm>=1.0",  # forward_intermediates, ModelEmaV3
        "numpy",
        "tensorboard",
        "scikit-learn",
        "rich",
        "matplotlib",
        "pillow",
        "pyyaml",
        "safetensors",  # teachers trained elsewhere (also a timm dependency)
    ],
    extras_require={
        "export": ["onnx", "onnxruntime"],
        "test": ["pytest>=7", "pytest-xdist>=3", "onnx", "onnxruntime"],  # the suite runs one worker per core
    },
)
