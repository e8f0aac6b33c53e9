#!/usr/bin/env bash
# MMBench-CN (dev): mmbench.sh on eval/mmbench/mmbench_dev_cn_20231003.tsv with the Chinese prompt (--lang cn).
SPLIT="${SPLIT:-mmbench_dev_cn_20231003}" SCORE_NAME=mmbench_cn LANG_ARGS="--lang cn" \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/mmbench.sh"
