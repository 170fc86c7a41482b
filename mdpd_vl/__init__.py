"""mdpd_vl: Masked Dual Path Distillation for memory-efficient vision-language fine-tuning.

Importing the package is cheap: sub-packages (torch models, data, evaluators) load on first use.
"""

__version__ = "0.1.0"
