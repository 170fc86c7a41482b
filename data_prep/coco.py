"""COCO (Karpathy split) -> canonical index. Reads dataset_coco.json + train2014/ val2014/ (restval
folded into train; images with more than 5 captions keep them all), or the VSE-infinity precomp
layout (precomp/{train,dev,test,testall}_caps.txt, _ids.txt, id_mapping.json + images/, or _ims.npy
region features). Example:

    python data_prep/coco.py --raw data/coco --out $MDPD_DATA/coco
"""

from __future__ import annotations

import sys

from mdpd_vl.data.prep.common import base_parser, run_cli
from mdpd_vl.data.prep.karpathy import add_arguments, prepare_coco
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and prepare COCO; exit status 2 on bad input."""
    parser = base_parser("coco", __doc__)
    names = add_arguments(parser)
    return run_cli(prepare_coco, parser.parse_args(argv), names)


if __name__ == "__main__":
    sys.exit(main())
