"""fusedopt's optimizers: drop-in replacements for torch.optim.SGD, Adam, AdamW, RMSprop and
Adagrad, and Lion; each is one update rule of csrc/update_rules.h plus its class here."""

from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.lion import Lion
from fusedopt.optim.rmsprop import Adagrad, RMSprop
from fusedopt.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion"]
