"""MSVD (CLIP4Clip's split) -> canonical index. Reads raw-captions.pkl, {train,val,test}_list.txt and
the videos found under YouTubeClips/ (id = file name minus extension). The pickle must come from a
trusted source (unpickling can run code); it is read only from --raw. Example:

    python data_prep/msvd.py --raw data/msvd --out $MDPD_DATA/msvd
"""

from __future__ import annotations

import sys

from mdpd_vl.data.prep.common import base_parser, run_cli
from mdpd_vl.data.prep.msvd import prepare
from mdpd_vl.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and prepare MSVD; exit status 2 on bad input."""
    parser = base_parser("msvd", __doc__)
    parser.add_argument("--min-frames", dest="min_frames", type=int, default=1,
                        help="a video with fewer decodable frames is bad")
    parser.add_argument("--video-dir", dest="video_dir", help="video folder, relative to --raw")
    return run_cli(prepare, parser.parse_args(argv), ("min_frames", "video_dir"))


if __name__ == "__main__":
    sys.exit(main())
