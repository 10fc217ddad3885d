"""fusedopt's optimizers: drop-in replacements for torch.optim.SGD, Adam and AdamW."""

from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
