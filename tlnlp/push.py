"""Push a finished tlnlp output folder to the Hugging Face Hub.

    python -m tlnlp.push OUTPUT_DIR --repo_id user/name [--private] [--token TOKEN]

Uploads the weights, config, tokenizer, model card, all_results.json and training_config.yaml, and
nothing else (no checkpoints, optimizer states or logs).
"""

import argparse
import logging
import sys
from pathlib import Path

from tlnlp.core.errors import UserInputError
from tlnlp.core.files import RESULTS_FILE
from tlnlp.hub.repo import push


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlnlp.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="A finished tlnlp run (holds model.safetensors and all_results.json).")
    parser.add_argument("--repo_id", required=True, help="Hub repo id, 'user/name' or 'name'.")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the saved login).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    folder = Path(args.output_dir)
    if not (folder / RESULTS_FILE).is_file():
        print(f"error: {folder} is not a finished tlnlp run (no all_results.json).", file=sys.stderr)
        return 2
    try:
        url = push(folder, args.repo_id, args.token, args.private)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
