"""Run a transfer-learning study: arms x label counts x seeds, then a Markdown report with plots.

Example (the domain study):
  python scripts/experiment.py --dataset movie-sentences --model minilm-l6 --label_counts 1000 --seeds 1,2,3 \
      --arms pretrained,dapt:task,dapt:movie-reviews,dapt:wiki-leads --output_dir runs/domain \
      -- --continued_pretraining_steps 300

Arms: scratch, pretrained, frozen:K, dapt:CORPUS (CORPUS 'task': the set's own texts), each optionally @MODEL
(else --model). A dapt arm runs `--continued_pretraining CORPUS`; its --continued_pretraining_* options go after
`--` with the other fine-tuning options.
Options after `--` go to every fine-tuning run (e.g. -- --learning_rate 1e-4 --num_train_epochs 3).
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

from tlnlp.core.errors import UserInputError
from tlnlp.recipes.study import parse_arm, run_study, write_report


def main(argv: list[str]) -> int:
    finetune_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="Labeled data: a built-in set or a Hub dataset id.")
    parser.add_argument("--model", help="Default encoder for arms without @MODEL (folder, built-in name, Hub id).")
    parser.add_argument("--arms", default="scratch,pretrained", help="Comma-separated arms (see above).")
    parser.add_argument("--label_counts", default="1000", help="Comma-separated numbers of labeled examples.")
    parser.add_argument("--seeds", default="42", help="Comma-separated seeds (sampling and initialisation).")
    parser.add_argument("--output_dir", required=True, help="Study folder; finished runs in it are skipped.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    try:
        arms = [parse_arm(spec.strip(), args.model) for spec in args.arms.split(",") if spec.strip()]
        counts = [int(n) for n in args.label_counts.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        rows = run_study(arms=arms, dataset=args.dataset, label_counts=counts, seeds=seeds, output_dir=output_dir,
                         finetune_args=finetune_args)
    except (UserInputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python scripts/experiment.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_report(output_dir, rows, None, f"Transfer study on {args.dataset}", command)
    print((output_dir / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
