"""GQA (balanced) -> canonical index + answer vocabulary. Reads
{train,val,testdev,test,challenge}_balanced_questions.json and images/{imageId}.jpg. Example:

    python data_prep/gqa.py --raw data/gqa --out $MDPD_DATA/gqa --splits train,val,testdev
"""

from __future__ import annotations

import sys

from mdpd_vl.data.prep.common import base_parser, run_cli
from mdpd_vl.data.prep.gqa import prepare
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and prepare GQA; exit status 2 on bad input."""
    parser = base_parser("gqa", __doc__)
    parser.add_argument("--splits", help="comma list of train,val,testdev,test,challenge (default: those present)")
    parser.add_argument("--vocab", help="existing ans2label JSON (relative to --raw unless absolute)")
    parser.add_argument("--min-count", dest="min_count", type=int, default=1,
                        help="without --vocab: keep answers seen at least this many times in train+val")
    parser.add_argument("--image-dir", dest="image_dir", help="image folder, relative to --raw")
    return run_cli(prepare, parser.parse_args(argv), ("splits", "vocab", "min_count", "image_dir"))


if __name__ == "__main__":
    sys.exit(main())
