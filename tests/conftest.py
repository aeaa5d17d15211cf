"""Shared test setup: offline tiktoken files and the shared SMS Spam Collection, when present."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMS_SPAM_FILE = Path(os.environ.get("SMS_SPAM_FILE", SHARED / "data" / "sms_spam" / "SMSSpamCollection"))

# tiktoken downloads its BPE files on first use; offline, point it at the shared copy.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken-cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")


@pytest.fixture
def sms_spam_file() -> Path:
    """The real UCI file; tests that need it skip, saying why, where it is absent."""
    if not SMS_SPAM_FILE.is_file():
        pytest.skip(f"the SMS Spam Collection is not at {SMS_SPAM_FILE} (set SMS_SPAM_FILE)")
    return SMS_SPAM_FILE
