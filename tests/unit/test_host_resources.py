"""What a worker must have to itself on its host: a web port no other process listens
on, and a data directory no other live worker holds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from holdwall_stream.errors import SettingsError
from holdwall_stream.host_resources import DATA_DIR_LOCK, claim_data_dir, ensure_web_port_free
from holdwall_stream.settings import load_settings


def test_a_free_web_port_passes_and_a_listened_one_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        with pytest.raises(SettingsError, match=f"WEB_PORT: {port} is taken on 127.0.0.1"):
            ensure_web_port_free(load_settings(web_host="127.0.0.1", web_port=port))
    ensure_web_port_free(load_settings(web_host="127.0.0.1", web_port=port))  # let go: free


def test_a_data_dir_is_one_workers_until_it_lets_go(tmp_path: Path) -> None:
    settings = load_settings(faust_data_dir=str(tmp_path / "data" / "worker-1"))
    held = claim_data_dir(settings)  # creates the directories
    assert (tmp_path / "data" / "worker-1" / DATA_DIR_LOCK).read_text() == str(os.getpid())
    in_use = rf"FAUST_DATA_DIR: .* in use by another worker \(pid {os.getpid()}\)"
    with pytest.raises(SettingsError, match=in_use):
        claim_data_dir(settings)
    os.close(held)  # what the kernel does when the process ends, kill -9 included
    os.close(claim_data_dir(settings))


def test_a_data_dir_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = load_settings(faust_data_dir=str(tmp_path / "file" / "data"))
    with pytest.raises(SettingsError, match=r"FAUST_DATA_DIR: cannot use .*file/data"):
        claim_data_dir(settings)
