"""Pushing finished models to the Hugging Face Hub: checked before training, exact files, retried.

    python -m tlnlp.push OUTPUT_DIR --repo_id user/name [--private] [--token ...]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from tlnlp.core.errors import UserInputError
from tlnlp.core.files import CARD_FILE, CONFIG_FILE, RESULTS_FILE
from tlnlp.hub.card import write_card

try:  # the HTTP client huggingface_hub uses (httpx2 from huggingface_hub 2.x, httpx before)
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Exactly what a user needs to load and understand the model. Never checkpoints, optimizer states,
# tracker logs or predictions: those stay local (`upload_folder` would take them along).
UPLOAD_FILES = (
    "model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "classifier.py",
    CARD_FILE, RESULTS_FILE, CONFIG_FILE,
)
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)


class HubError(UserInputError):
    """The Hub refused or could not be reached; the message says what to do."""


def resolve_token(token: str | None) -> str:
    token = token or get_token()  # HF_TOKEN, or the token saved by `hf auth login`
    if not token:
        raise HubError(
            "Pushing to the Hub needs a token with write access: pass --hub_token, set HF_TOKEN, or run "
            "`hf auth login` first. Create one at https://huggingface.co/settings/tokens."
        )
    return token


def check_repo_id(repo_id: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"--hub_model_id {repo_id!r} is not a valid repo id ('user/name' or 'name'): {error}") from None
    return repo_id


def _transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, (TransportError, ConnectionError, TimeoutError))


def _explain(error: Exception, what: str, repo_id: str) -> HubError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    advice = {
        401: "the token was rejected: check --hub_token / HF_TOKEN (it may be expired or mistyped)",
        403: f"the token may not write to {repo_id!r}: use a token with write access to that namespace",
        404: f"{repo_id!r} or its namespace was not found: check the user or organisation in --hub_model_id",
    }.get(status, f"{type(error).__name__}: {error}")
    return HubError(f"Hub {what} failed ({'HTTP ' + str(status) if status else 'no response'}): {advice}.")


def with_retries(call: Callable[[], T], what: str, repo_id: str) -> T:
    """Retry transient failures (5xx, 429, connection resets) with backoff; explain the rest."""
    delays = RETRY_DELAYS_S
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except (HfHubHTTPError, TransportError, ConnectionError, TimeoutError) as error:
            if not _transient(error) or attempt == len(delays):
                raise _explain(error, what, repo_id) from None
            logger.warning("Hub %s failed (%s); retrying in %.0f s", what, error.__class__.__name__, delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def create_repo(repo_id: str, token: str, private: bool) -> str:
    """Create (or find) the repo; returns its full id. Run before training, so a bad token fails fast."""
    check_repo_id(repo_id)
    url = with_retries(lambda: HfApi().create_repo(repo_id, token=token, private=private, exist_ok=True),
                       "repo creation", repo_id)
    return url.repo_id


def files_to_upload(output_dir: Path) -> list[Path]:
    files = [output_dir / name for name in UPLOAD_FILES if (output_dir / name).is_file()]
    files += sorted(p for p in output_dir.glob("model-*-of-*.safetensors"))  # sharded weights
    if not any(p.suffix == ".safetensors" for p in files):
        raise HubError(f"{output_dir} holds no model weights (model.safetensors); is it a finished tlnlp run?")
    return files


def push(output_dir: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Write the model card and upload the final model in one commit; returns the commit URL."""
    token = resolve_token(token)
    repo_id = create_repo(repo_id, token, private)
    write_card(output_dir, repo_id)
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files_to_upload(output_dir)]
    commit = with_retries(
        lambda: HfApi().create_commit(repo_id, operations, commit_message="Upload model trained with tlnlp", token=token),
        "upload", repo_id,
    )
    logger.info("Pushed %d files to %s: %s", len(operations), repo_id, commit.commit_url)
    return commit.commit_url


def preflight(cfg, accelerator) -> str | None:
    """Check the token and create the repo before any training step; every rank learns the outcome."""
    if not cfg.push_to_hub:
        return None
    from accelerate.utils import broadcast_object_list

    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            token = resolve_token(cfg.hub_token)
            outcome = [("ok", create_repo(cfg.hub_model_id or Path(cfg.output_dir).name, token, cfg.hub_private_repo))]
        except HubError as error:
            outcome = [("error", str(error))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    status, value = outcome[0]
    if status == "error":
        raise HubError(f"{value} Nothing was trained.")
    logger.info("Hub repo %s is ready; the model is pushed there after training.", value)
    return value


def publish(cfg, accelerator, repo_id: str | None) -> None:
    """Push after training (main process only). On failure the local output stays, and the error says how to retry."""
    if repo_id is None or not accelerator.is_main_process:
        return
    try:
        push(Path(cfg.output_dir), repo_id, cfg.hub_token, cfg.hub_private_repo)
    except HubError as error:
        raise HubError(
            f"{error} The trained model is saved in {cfg.output_dir}; push it later with "
            f"`python -m tlnlp.push {cfg.output_dir} --repo_id {repo_id}`."
        ) from None
