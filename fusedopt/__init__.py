"""fusedopt: drop-in torch.optim SGD / Adam / AdamW / RMSprop / Adagrad (and Lion) whose whole step is one fused kernel call per device.

Importing fusedopt never crashes for lack of the compiled extension: it warns and says how to build it.
The optimizers raise the same explanation when they are used without it.
"""

__version__ = "0.1.0"

from fusedopt._extension import extension_available, extension_error  # noqa: F401
from fusedopt.optim import SGD, Adagrad, Adam, AdamW, Lion, RMSprop  # noqa: F401
from fusedopt import lr_scheduler  # noqa: F401
from fusedopt.clip import clip_grad_norm_  # noqa: F401
from fusedopt.flat import FlatParams, flatten_  # noqa: F401

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion", "clip_grad_norm_", "flatten_", "FlatParams", "lr_scheduler", "extension_available", "extension_error", "__version__"]
