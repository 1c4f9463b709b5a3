"""Settings: defaults, TOML, environment overrides, and the one-line exit-2 errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tower_progress.config import ConfigError, default_state_dir, load
from tower_progress.core.model import JobState


def test_defaults_without_file_or_env(tmp_path: Path) -> None:
    settings = load(None, {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "s")})
    assert (settings.host, settings.port, settings.token) == ("127.0.0.1", 8330, None)
    assert settings.database_url is None
    assert settings.jobs_table == "public.production_jobs"
    assert [(c.name, c.url, c.bridge) for c in settings.comfyui] == [
        ("local", "http://127.0.0.1:8188", False)
    ]
    assert settings.comfyui[0].client_id.startswith("tower-progress-")
    assert settings.state_dir == tmp_path / "s" / "tower-progress"


def test_toml_then_env_override(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        """
[server]
port = 9000
[database]
url = "postgresql://u:secret@db/render"
jobs_table = "anime_api.production_jobs"
[database.columns]
comfyui_job_id = "prompt_id"
[tracker.status_map]
"awaiting-qa" = "completed"
[[comfyui]]
name = "box1"
url = "http://10.0.0.5:8188/"
bridge = true
[[comfyui]]
name = "box2"
url = "http://10.0.0.6:8188"
""",
        encoding="utf-8",
    )
    env = {"TOWER_PROGRESS_PORT": "9100", "TOWER_PROGRESS_COMFYUI_CLIENT_ID": "watch-1"}
    settings = load(path, env)
    assert settings.port == 9100
    assert settings.columns["comfyui_job_id"] == "prompt_id"
    assert settings.status_map == {"awaiting-qa": JobState.COMPLETED}
    assert [(c.name, c.url, c.client_id, c.bridge) for c in settings.comfyui] == [
        ("box1", "http://10.0.0.5:8188", "watch-1", True),
        ("box2", "http://10.0.0.6:8188", settings.comfyui[1].client_id, False),
    ]
    assert "secret" not in str(settings.redacted())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TOWER_PROGRESS_PORT": "80a"},
            "config error: TOWER_PROGRESS_PORT = '80a' is not allowed: an integer from 1 to 65535",
        ),
        (
            {"TOWER_PROGRESS_HOST": "0.0.0.0"},
            "config error: server.host = '0.0.0.0' is not allowed: "
            "a loopback address unless server.token is set",
        ),
        (
            {"TOWER_PROGRESS_DATABASE_URL": "mysql://x"},
            "config error: TOWER_PROGRESS_DATABASE_URL = 'mysql://x' is not allowed: "
            "a postgresql:// URL, or empty for the embedded database",
        ),
        (
            {"TOWER_PROGRESS_COMFYUI_URL": "ftp://x"},
            "config error: TOWER_PROGRESS_COMFYUI_URL = 'ftp://x' is not allowed: "
            "an http:// or https:// URL such as http://127.0.0.1:8188",
        ),
        (
            {"TOWER_PROGRESS_JOBS_TABLE": "jobs; drop table x"},
            "config error: TOWER_PROGRESS_JOBS_TABLE = 'jobs; drop table x' is not allowed: "
            "a table name, optionally schema-qualified (schema.table)",
        ),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, {"HOME": "/tmp", **env})
    assert str(caught.value) == message


def test_bad_toml_value(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[tracker.status_map]\nqa = "finished"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    assert str(caught.value) == (
        "config error: tracker.status_map.qa = 'finished' is not allowed: one of "
        "pending, queued, running, completed, failed, canceled, lost"
    )


def test_state_dir_never_under_root_home_for_root() -> None:
    assert default_state_dir({"HOME": "/root"}, euid=0) == Path("/var/lib/tower-progress")
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/tp"}, euid=0) == Path("/var/lib/tp")
    assert default_state_dir({"HOME": "/home/a"}, euid=1000) == Path(
        "/home/a/.local/state/tower-progress"
    )


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tower_progress", "serve"],
        env={"TOWER_PROGRESS_PORT": "99999", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "config error: TOWER_PROGRESS_PORT = '99999' is not allowed: an integer from 1 to 65535\n"
    )
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[database.columns]\nprompt = "x"\n',
            "config error: database.columns.prompt = 'x' is not allowed: one of the keys "
            "id, status, comfyui_job_id, title, total_frames, created_at, updated_at",
        ),
        (
            '[database.columns]\nid = "bad name"\n',
            "config error: database.columns.id = 'bad name' is not allowed: a column name",
        ),
        (
            "[database.write_back_columns]\npercent = 3\n",
            "config error: database.write_back_columns.percent = 3 is not allowed: a column name",
        ),
        (
            "[database]\ncolumns = 5\n",
            "config error: database.columns = 5 is not allowed: a table of name = column",
        ),
        (
            '[database.columns]\ncomfyui_job_id = "prompt"\n'
            '[database.write_back_columns]\nstage = "prompt"\n',
            "config error: database.write_back_columns.stage = 'prompt' is not allowed: "
            "a column the daemon does not read (not one of [database.columns])",
        ),
        (
            '[database.write_back_columns]\nstage = "status"\n',
            "config error: database.write_back_columns.stage = 'status' is not allowed: "
            "a column the daemon does not read (not one of [database.columns])",
        ),
        (
            "[database]\nwrite_back = true\n",
            "config error: database.write_back = True is not allowed: "
            "true only with a [database.write_back_columns] table",
        ),
    ],
)
def test_bad_column_tables(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    assert str(caught.value) == message
