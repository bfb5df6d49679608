"""melanoma: Vision Transformers for skin-lesion classification."""

__version__ = "0.1.0"
