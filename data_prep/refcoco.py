"""RefCOCO / RefCOCO+ / RefCOCOg -> canonical index. Reads lichengunc/refer's
<variant>/refs(<split-by>).p + instances.json, or MDETR's finetune_<variant>_<split>.json, with COCO
train2014 images. The pickle must come from a trusted source (unpickling can run code); it is read
only from --raw. Example:

    python data_prep/refcoco.py --raw data/refer --out $MDPD_DATA/refcocog --variant refcocog --split-by umd
"""

from __future__ import annotations

import sys

from mdpd_vl.data.prep.common import base_parser, run_cli
from mdpd_vl.data.prep.refcoco import prepare
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and prepare one RefCOCO variant; exit status 2 on bad input."""
    parser = base_parser("refcoco", __doc__)
    parser.add_argument("--variant", choices=("refcoco", "refcoco+", "refcocog"), default="refcoco")
    parser.add_argument("--split-by", dest="split_by", choices=("unc", "umd", "google"),
                        help="default unc (umd for refcocog)")
    parser.add_argument("--source", choices=("auto", "refer", "mdetr"), default="auto")
    parser.add_argument("--image-dir", dest="image_dir", help="train2014 image folder, relative to --raw")
    return run_cli(prepare, parser.parse_args(argv), ("variant", "split_by", "source", "image_dir"))


if __name__ == "__main__":
    sys.exit(main())
