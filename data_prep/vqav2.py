"""VQAv2 -> canonical index + answer vocabulary. Reads the official
v2_OpenEnded_mscoco_*_questions.json and v2_mscoco_*_annotations.json with COCO images
(train2014/ val2014/ test2015/); soft scores 0.3/0.6/0.9/1.0 as the official accuracy. Example:

    python data_prep/vqav2.py --raw data/vqa --out $MDPD_DATA/vqav2 --vocab trainval_ans2label.json
"""

from __future__ import annotations

import sys

from mdpd_vl.data.prep.common import base_parser, run_cli
from mdpd_vl.data.prep.vqav2 import prepare
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and prepare VQAv2; exit status 2 on bad input."""
    parser = base_parser("vqav2", __doc__)
    parser.add_argument("--splits", help="comma list of train,val,test-dev,test (default: those present)")
    parser.add_argument("--vocab", help="existing ans2label JSON (relative to --raw unless absolute)")
    parser.add_argument("--min-count", dest="min_count", type=int, default=9,
                        help="without --vocab: keep answers of at least this many questions")
    parser.add_argument("--image-dir", dest="image_dir", help="folder holding train2014/ etc., relative to --raw")
    return run_cli(prepare, parser.parse_args(argv), ("splits", "vocab", "min_count", "image_dir"))


if __name__ == "__main__":
    sys.exit(main())
