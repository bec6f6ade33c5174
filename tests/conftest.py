"""Shared pytest setup: tests run offline, single-threaded per process, with the `slow` marker registered."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end tests (skipped by `make test-fast`)")
