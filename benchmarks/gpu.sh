#!/usr/bin/env bash
# The GPU check, for one H100 or H200 with this repository copied to it (no network needed):
#
#   bash benchmarks/gpu.sh                            # the SMS file at ../shared/data/sms_spam/SMSSpamCollection
#   bash benchmarks/gpu.sh path/to/SMSSpamCollection
#   bash benchmarks/gpu.sh path/to/SMSSpamCollection --dry-run   # any machine: checks the script, measures nothing
#
# Runs the default job (`python train.py --data ... --init random`) and the speed benchmark's
# method (benchmarks/finetune_speed.py) for last-block and all, 5 epochs, each without and with
# --compile, every one a whole process timed from its start to its exit, and writes one JSON,
# benchmarks/gpu.json (GPU_JSON to move it), with the card's name, its compute capability and the
# precision --precision auto picks on it. Targets, whole process: the default job <= 10 s, all
# <= 12 s. Expected to take under 5 minutes in all on one H100/H200. GPT-2's tokenizer ships in
# gpt2_bpe/: nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/sms_spam/SMSSpamCollection}
[ $# -gt 0 ] && shift
if [ ! -f "$data" ]; then
    echo "error: no SMS Spam Collection file at $data; pass its path as the first argument" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/finetune_speed.py --gpu-check --data "$data" \
    --json "${GPU_JSON:-benchmarks/gpu.json}" "$@"
