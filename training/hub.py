"""Uploading a saved model folder to the Hugging Face Hub with `huggingface_hub.HfApi`."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

# Run artefacts that are not part of the model repo.
UPLOAD_IGNORE = ["checkpoints/*", "runs/*", "*.tmp/*"]


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Creates the Hub repo (if needed) and uploads the saved model folder, checkpoints and logs excluded.

    Args:
        folder (`Path`): the saved model folder.
        repo_id (`str`): the Hub repo, e.g. `"your-name/xraycap-iu"`.
        private (`bool`, *optional*, defaults to `False`): create the repo as private.

    Returns:
        `str`: the repo URL.

    Raises:
        `RuntimeError`: when the Hub cannot be reached or refuses the upload; it says how to upload later.
    """
    api = HfApi()
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=UPLOAD_IGNORE,
            commit_message="Upload xraycap model trained with run_captioning.py",
        )
    except Exception as err:  # offline, no token, no rights: say what happened and where the model still is
        raise RuntimeError(
            f"Could not push {folder} to the Hub repo {repo_id!r} ({type(err).__name__}: {err}). The model folder is "
            f"saved locally; check the network and `hf auth login`, then run `hf upload {repo_id} {folder}`."
        ) from err
    return str(repo_url)
