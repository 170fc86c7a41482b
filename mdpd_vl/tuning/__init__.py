"""See mdpd_vl/README.md for the contracts of this sub-package."""
