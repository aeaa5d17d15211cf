"""Shared test setup: the shared SMS Spam Collection, when present. (Tokenizing needs nothing: GPT-2's
BPE files ship in gpt2_bpe/.)"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMS_SPAM_FILE = Path(os.environ.get("SMS_SPAM_FILE", SHARED / "data" / "sms_spam" / "SMSSpamCollection"))


@pytest.fixture
def sms_spam_file() -> Path:
    """The real UCI file; tests that need it skip, saying why, where it is absent."""
    if not SMS_SPAM_FILE.is_file():
        pytest.skip(f"the SMS Spam Collection is not at {SMS_SPAM_FILE} (set SMS_SPAM_FILE)")
    return SMS_SPAM_FILE


def offline_env(folder: Path) -> dict[str, str]:
    """The environment of a fresh clone on a machine without network: every connection through a
    refused proxy, tiktoken's cache an empty folder, home (and every cache under it) empty, the
    repository on the import path."""
    unreachable = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
    (folder / "home").mkdir(parents=True, exist_ok=True)
    (folder / "tiktoken-cache").mkdir(exist_ok=True)
    env = {name: value for name, value in os.environ.items()
           if not name.lower().endswith("_proxy") and not name.startswith(("TIKTOKEN", "HF_", "XDG_", "GPT2_"))}
    return {**env, "HOME": str(folder / "home"), "TIKTOKEN_CACHE_DIR": str(folder / "tiktoken-cache"),
            "PYTHONPATH": str(REPO), **{name: unreachable for name in
                                        ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY")}}
