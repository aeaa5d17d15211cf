"""Shared test setup: the real SMS Spam Collection, when there is one. (Tokenizing needs nothing:
GPT-2's BPE files ship in gpt2_bpe/.)

The tests that need the UCI file look for it in three places, first found wins:
1. the path in the environment variable SMS_SPAM_FILE (when set, only there);
2. this project's download cache, where `python train.py` puts it on its first run;
3. ../shared/data/sms_spam/SMSSpamCollection, beside the repository (as on our CI machine).
Where it is in none, they skip and say why and how to get it (pyproject.toml's -rfEs prints the reason).
"""

import os
from pathlib import Path

import pytest

import hub

REPO = Path(__file__).resolve().parents[1]
SMS_SPAM_PLACES = [
    hub.default_cache_dir() / "sms_spam" / hub.SMS_SPAM_MEMBER,
    REPO.parent / "shared" / "data" / "sms_spam" / hub.SMS_SPAM_MEMBER,
]
if os.environ.get("SMS_SPAM_FILE"):
    SMS_SPAM_FILE = Path(os.environ["SMS_SPAM_FILE"])
    SMS_SPAM_MISSING = f"the SMS Spam Collection is not at {SMS_SPAM_FILE}, where SMS_SPAM_FILE points"
else:
    SMS_SPAM_FILE = next((path for path in SMS_SPAM_PLACES if path.is_file()), SMS_SPAM_PLACES[0])
    SMS_SPAM_MISSING = (
        f"the SMS Spam Collection is not in the download cache ({SMS_SPAM_PLACES[0]}) nor beside the repository "
        f"({SMS_SPAM_PLACES[1]}), and SMS_SPAM_FILE is not set; run `python train.py` once (it downloads the file "
        f"to the cache; `python -c 'import hub; hub.download_sms_spam()'` downloads only that), or set SMS_SPAM_FILE "
        f"to a copy"
    )


@pytest.fixture
def sms_spam_file() -> Path:
    """The real UCI file; tests that need it skip, saying where they looked, where it is absent."""
    if not SMS_SPAM_FILE.is_file():
        pytest.skip(SMS_SPAM_MISSING)
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
