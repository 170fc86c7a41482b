"""MSR-VTT (CLIP4Clip's 1k-A split) -> canonical index. Reads MSRVTT_data.json,
MSRVTT_train.9k.csv (or 7k), MSRVTT_JSFUSION_test.csv and videos/all/{video_id}.mp4 (.webm fallback).
Example:

    python data_prep/msrvtt.py --raw data/msrvtt --out $MDPD_DATA/msrvtt --train-csv 9k
"""

from __future__ import annotations

import sys

from mdpd_vl.data.prep.common import base_parser, run_cli
from mdpd_vl.data.prep.msrvtt import prepare
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and prepare MSR-VTT; exit status 2 on bad input."""
    parser = base_parser("msrvtt", __doc__)
    parser.add_argument("--train-csv", dest="train_csv", choices=("9k", "7k"), default="9k")
    parser.add_argument("--expand-sentences", dest="expand_sentences", action="store_true",
                        help="one train item per (video, caption), as CLIP4Clip's --expand_msrvtt_sentences")
    parser.add_argument("--min-frames", dest="min_frames", type=int, default=1,
                        help="a video with fewer decodable frames is bad")
    parser.add_argument("--video-dir", dest="video_dir", help="video folder, relative to --raw")
    args = parser.parse_args(argv)
    return run_cli(prepare, args, ("train_csv", "expand_sentences", "min_frames", "video_dir"))


if __name__ == "__main__":
    sys.exit(main())
