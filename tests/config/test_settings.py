"""Settings: file, environment overrides, and one clear line per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from triagenode.config.settings import load_settings
from triagenode.domain import Priority
from triagenode.errors import ConfigError


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "triagenode.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_values_and_environment_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(
        tmp_path,
        f"""
        [node]
        data_dir = "{tmp_path / "data"}"
        [scp]
        ae_title = "EDNODE"
        port = 4242
        [study]
        stable_after_s = 12
        stable_after_by_priority = {{ stat = 2 }}
        [[destinations]]
        name = "pacs"
        ae_title = "PACS"
        host = "127.0.0.1"
        port = 104
        """,
    )
    monkeypatch.setenv("TRIAGENODE_SCP__PORT", "11113")
    settings = load_settings(path)
    assert settings.scp.ae_title == "EDNODE"
    assert settings.scp.port == 11113  # the environment wins over the file
    assert settings.study.quiet_period(Priority.stat) == 2
    assert settings.study.quiet_period(Priority.routine) == 12
    assert settings.destinations[0].ae_title == "PACS"
    assert settings.database_url.endswith("data/triagenode.sqlite3")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[scp]\nport = 0", "scp.port: "),
        ("[scp]\nae_title = ''", "scp.ae_title: must be 1 to 16"),
        ("[scp]\nae_title = 'THIS_TITLE_IS_TOO_LONG'", "scp.ae_title: must be 1 to 16"),
        ("[scp]\nprot = 104", "scp.prot: unknown key"),
        ("[scp]\nport = 'many'", "scp.port: "),
        ("[nodes]\ndata_dir = '.'", "nodes: unknown key"),
        ("[model]\nsource = 'ftp://x'", "model.source: must be 'demo'"),
        ("[node]\nuid_root = '1.02.3'", "node.uid_root: must be a DICOM UID root"),
        ("[study]\nstable_after_by_priority = { asap = 3 }", "unknown priority 'asap'"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(
            write_config(
                tmp_path,
                f"[node]\ndata_dir = '{tmp_path}'\n" + text
                if not text.startswith("[node]")
                else text,
            )
        )
    assert expected in str(error.value)


def test_unknown_environment_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRIAGENODE_SCPP__PORT", "1")
    with pytest.raises(ConfigError, match="TRIAGENODE_SCPP__PORT: unknown setting"):
        load_settings(None, node={"data_dir": str(tmp_path)})


def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"node\.data_dir: cannot create"):
        load_settings(None, node={"data_dir": str(blocker / "data")})


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write_config(tmp_path, "[scp\nport=1"))


def test_example_config_is_valid_and_documents_every_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(__file__).parents[2] / "triagenode.example.toml"
    monkeypatch.chdir(tmp_path)  # its data_dir is relative
    settings = load_settings(example)
    assert settings.scp.port == 11112
    assert settings.study.quiet_period(Priority.stat) == 5.0
    text = example.read_text(encoding="utf-8")
    for section in type(settings).model_fields:
        assert f"[{section}" in text or f"[[{section}" in text or f"# [{section}" in text, section


def test_command_line_flags_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from triagenode.cli.common import settings_from_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRIAGENODE_MODEL__SOURCE", "local-dir:/models/biomedclip")
    args = argparse.Namespace(config=None)
    assert settings_from_args(args).model.source == "local-dir:/models/biomedclip"
    assert settings_from_args(args, model={"source": "demo"}).model.source == "demo"
    with pytest.raises(ConfigError, match=r"scp\.port: "):
        settings_from_args(args, scp={"port": 0})
    monkeypatch.setenv("TRIAGENODE_NODE__ENVIRONMENT", "production")
    monkeypatch.setenv("TRIAGENODE_SCP__ALLOW_ANY_CALLING_AE", "true")
    with pytest.raises(ConfigError, match="'demo' is refused"):
        settings_from_args(args, model={"source": "demo"})


# database.password_file: the PostgreSQL password from a secret file (compose, Kubernetes)


def test_database_password_file_goes_into_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "db_password"
    secret.write_text("p@ss:w/rd\n", encoding="utf-8")  # as `echo ... > file` writes it
    monkeypatch.setenv("TRIAGENODE_DATABASE__URL", "postgresql+psycopg://triagenode@db:5432/tn")
    monkeypatch.setenv("TRIAGENODE_DATABASE__PASSWORD_FILE", str(secret))
    monkeypatch.setenv("TRIAGENODE_NODE__DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()

    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    assert url.password == "p@ss:w/rd"
    assert (url.username, url.host, url.port, url.database) == ("triagenode", "db", 5432, "tn")
    # The setting itself holds the file's name, never the password.
    assert "p@ss" not in settings.model_dump_json()


@pytest.mark.parametrize(
    ("url", "content", "expected"),
    [
        ("postgresql+psycopg://tn@db/tn", None, "database.password_file: cannot read"),
        ("postgresql+psycopg://tn@db/tn", "\n", "is empty"),
        (None, "pw", "database.password_file: needs database.url to be a postgresql://"),
        ("sqlite:///x.sqlite3", "pw", "needs database.url to be a postgresql://"),
    ],
)
def test_database_password_file_problems_name_the_key(
    tmp_path: Path, url: str | None, content: str | None, expected: str
) -> None:
    secret = tmp_path / "db_password"
    if content is not None:
        secret.write_text(content, encoding="utf-8")
    database = {"password_file": str(secret)} | ({"url": url} if url else {})
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("+", r"\+")):
        load_settings(node={"data_dir": str(tmp_path / "data")}, database=database)
