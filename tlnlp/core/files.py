"""The names of the files a run leaves in its output folder: one place, for the code that writes them and
the code that reads them."""

RESULTS_FILE = "all_results.json"
CONFIG_FILE = "training_config.yaml"
CARD_FILE = "README.md"
EVAL_HISTORY_FILE = "eval_history.json"
PREDICTIONS_FILE = "test_predictions.jsonl"
