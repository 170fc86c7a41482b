"""Flickr30K -> canonical index. Reads the Karpathy split JSON (dataset_flickr30k.json +
flickr30k-images/) or the VSE-infinity precomp layout (precomp/{split}_caps.txt, _ids.txt,
id_mapping.json, optional _ims.npy region features). Example:

    python data_prep/flickr30k.py --raw data/f30k --out $MDPD_DATA/flickr30k
"""

from __future__ import annotations

import sys

from mdpd_vl.data.prep.common import base_parser, run_cli
from mdpd_vl.data.prep.karpathy import add_arguments, prepare_flickr30k
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and prepare Flickr30K; exit status 2 on bad input."""
    parser = base_parser("flickr30k", __doc__)
    names = add_arguments(parser)
    return run_cli(prepare_flickr30k, parser.parse_args(argv), names)


if __name__ == "__main__":
    sys.exit(main())
