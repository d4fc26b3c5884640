"""Uploading a saved model folder to the Hugging Face Hub with `huggingface_hub.HfApi`: the model repo's files only."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

# What a model repo needs (root level only): weights, configs, the remote code (`*_xraycap.py`), tokenizer and
# processor files, the model card. Predictions, sample sheets, run_args.json (local paths), trainer_history.json,
# eval_results.json (its numbers are in the card), tracker logs and stray files stay local unless asked for.
UPLOAD_ALLOW = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "*_xraycap.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.j*",
    "processor_config.json",
    "preprocessor_config.json",
    "README.md",
]
# Never uploaded, whatever `extra` says: training state and partial writes.
UPLOAD_IGNORE = ["checkpoints/*", "*.tmp/*"]


def push_to_hub(folder: Path, repo_id: str, private: bool = False, extra: list[str] | None = None) -> str:
    """Creates the Hub repo (if needed) and uploads the model files of the saved folder.

    Args:
        folder (`Path`): the saved model folder.
        repo_id (`str`): the Hub repo, e.g. `"your-name/xraycap-iu"`.
        private (`bool`, *optional*, defaults to `False`): create the repo as private.
        extra (`list[str]`, *optional*): more file patterns to upload (`--hub_upload_extra`), e.g.
            `["predictions.jsonl", "eval_results.json"]`; `checkpoints/` is never uploaded.

    Returns:
        `str`: the repo URL.

    Raises:
        `RuntimeError`: when the Hub cannot be reached or refuses the upload; it says how to upload later.
    """
    api, patterns = HfApi(), [*UPLOAD_ALLOW, *(extra or [])]
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            allow_patterns=patterns,
            ignore_patterns=UPLOAD_IGNORE,
            commit_message="Upload xraycap model trained with run_captioning.py",
        )
    except Exception as err:  # offline, no token, no rights: say what happened and where the model still is
        raise RuntimeError(
            f"Could not push {folder} to the Hub repo {repo_id!r} ({type(err).__name__}: {err}). The model folder is "
            f"saved locally; check the network and `hf auth login`, then run `hf upload {repo_id} {folder} "
            f"--include {' '.join(repr(p) for p in patterns)}`."
        ) from err
    return str(repo_url)
