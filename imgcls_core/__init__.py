"""imgcls_core: the pure PyTorch + torchvision library under imgcls (never imports Ray).

Configuration (``config``), data sources and augmentation (``data``), the model
registry (``models``), the training engine (``engine``), evaluation
(``evaluation``) and a single-process runner (``runner``).
"""

__version__ = "0.1.0"
