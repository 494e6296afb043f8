"""mtkd: multi-teacher, multi-task knowledge distillation for image classification."""

__version__ = "0.1.0"
